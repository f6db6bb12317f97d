"""The built-in methods: each one a record of pieces (``samfunc.Pieces``) for the interpreter.

* ``sam``: SAM and ASAM, GSAM, Friendly-SAM, VaSSO, WSAM, ESAM, SAM-ON's mask,
  and ``sharpness_aware`` / ``with_policy`` to build one of your own;
* ``efficient``: LookSAM, AE-SAM, Momentum-SAM and MESA, at (nearly) the cost of SGD.

Everything here is re-exported flat from ``samfunc``.
"""
