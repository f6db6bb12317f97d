"""What a step does with a non-finite gradient: raise, skip, or pass it on.

A NaN in one element of one gradient leaf makes SAM's perturbation NaN in
every leaf (the norm is global), so the second gradient is NaN everywhere
while the loss at ``w`` can stay finite. The policies, shared by ``sam_grad``,
the train steps and the ``SAM`` class:

* ``"raise"``: raise ``NonFiniteGradientError`` naming the pass and the first
  non-finite leaf, before anything is updated (eager mode only: reading the
  flag synchronizes with the device, and a compiled graph cannot raise);
* ``"skip"``: leave params, buffers and optimizer state as they were and
  report the skipped step (the semantics of ``torch.amp.GradScaler``);
* ``"propagate"``: return the gradient as it is (``sam_grad``'s default; the
  caller decides, e.g. with ``apply_if_finite``).

Examples:
    >>> check_policy("nonfinite", "skip", ("raise", "skip", "propagate"))
    'skip'
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from . import _tree
from ._tree import PyTree

__all__ = [
    "NonFinitePolicy",
    "NonFiniteGradientError",
    "check_policy",
    "first_nonfinite_path",
    "raise_if_nonfinite",
    "refuse_raise_under_compile",
]

NonFinitePolicy = Literal["raise", "skip", "propagate"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient had a NaN or infinite element, and the policy was ``"raise"``."""


def check_policy(name: str, value: Any, allowed: tuple[str, ...]) -> NonFinitePolicy:
    """Returns ``value`` if it is one of ``allowed``, else raises naming ``name``.

    Examples:
        >>> check_policy("nonfinite", "skip", ("raise", "skip"))
        'skip'
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    policy: NonFinitePolicy = value  # type: ignore[assignment]
    return policy


def first_nonfinite_path(tree: PyTree) -> str | None:
    """The key path of the first leaf with a NaN or inf element (eager only; syncs)."""
    found = _tree.find_leaf(tree, lambda leaf: not bool(torch.isfinite(leaf).all()))
    return None if found is None else found[0]


def raise_if_nonfinite(grads: PyTree, where: str, loss: Any = None) -> None:
    """Raises ``NonFiniteGradientError`` if ``grads`` is not finite (eager only; syncs).

    Args:
        grads: the gradient to check.
        where: which gradient it is, for the message (e.g. ``"the first pass, at w"``).
        loss: the loss of that pass, shown in the message when given.
    """
    if _tree.norm_is_finite(grads):
        return
    path = first_nonfinite_path(grads)
    at = f", first at leaf {path!r}" if path is not None else " (its norm overflows)"
    shown = "" if loss is None else f"; the loss there was {float(loss):.6g}"
    raise NonFiniteGradientError(
        f"the gradient of {where} is not finite{at}{shown}. Nothing was updated. "
        f"Use nonfinite='skip' to skip such steps (as torch.amp.GradScaler does)"
    )


def refuse_raise_under_compile(name: str = "nonfinite") -> None:
    """``"raise"`` reads a flag from the device, which a compiled graph cannot do."""
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{name}='raise' cannot run inside torch.compile (a compiled graph cannot raise "
            f"on a tensor's value); use {name}='skip' or 'propagate' there"
        )
