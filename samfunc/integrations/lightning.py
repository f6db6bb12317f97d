"""What ``samfunc.SAM`` needs to know about training frameworks that wrap it.

Nothing here imports a framework (PyTorch Lightning is optional): the wrappers are
recognized by the attributes they keep.

PyTorch Lightning hands ``LightningModule.optimizers()`` a ``LightningOptimizer``
(``pytorch_lightning/core/optimizer.py``). It keeps the optimizer in ``_optimizer``,
forwards attribute *reads* to it with ``__getattr__``, and makes itself a subclass of
the optimizer's class, so ``wrapper.first_step()`` runs ``SAM.first_step`` with the
wrapper as ``self``: the attributes it writes (the step's flags, ``method_state``,
``skipped_steps``) would land on the wrapper, where the optimizer that Lightning
checkpoints never sees them. In manual optimization Lightning counts a step
(``trainer.global_step``, hence ``max_steps``) only around ``LightningOptimizer.step``,
through the two callbacks its loop sets on the wrapper, ``_on_before_step`` and
``_on_after_step`` (``pytorch_lightning/loops/optimization/manual.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["counted_as_step", "wrapped_optimizer"]


def wrapped_optimizer(optimizer: Any) -> Any:
    """The optimizer a ``LightningOptimizer``-style wrapper holds, or ``None``.

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> wrapped_optimizer(opt) is None
        True
    """
    inner = vars(optimizer).get("_optimizer")
    return inner if inner is not optimizer else None


@contextlib.contextmanager
def counted_as_step(wrapper: Any) -> Iterator[None]:
    """Runs the body as Lightning runs ``LightningOptimizer.step``: between its step callbacks.

    In manual optimization they count the step (``trainer.global_step``); elsewhere
    they do nothing. As in Lightning, the second one is not called if the body raises.
    A wrapper without them (not Lightning's) runs the body alone.

    Examples:
        >>> class Wrapper:
        ...     def __init__(self):
        ...         self.steps = 0
        ...         self._on_after_step = lambda: setattr(self, "steps", self.steps + 1)
        >>> wrapper = Wrapper()
        >>> with counted_as_step(wrapper):
        ...     pass
        >>> wrapper.steps
        1
    """
    hooks = vars(wrapper)
    before, after = hooks.get("_on_before_step"), hooks.get("_on_after_step")
    if callable(before):
        before()
    yield
    if callable(after):
        after()
