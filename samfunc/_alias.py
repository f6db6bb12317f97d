"""Popular optimizers as ``chain``s of small transforms, equal to ``torch.optim``.

Examples:
    >>> import torch
    >>> import samfunc
    >>> opt = samfunc.sgd(0.1, momentum=0.9, weight_decay=5e-4)
    >>> params = {"w": torch.ones(3)}
    >>> state = opt.init(params)
"""

from __future__ import annotations

from ._base import GradientTransformation, ScalarOrSchedule
from ._combine import chain
from ._schedule import check_schedule_nonnegative
from ._transform import (
    add_decayed_weights,
    decoupled_weight_decay,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from ._validate import check_bool, check_nonnegative, check_number

__all__ = ["sgd", "adam", "adamw"]


def _check_learning_rate(learning_rate: ScalarOrSchedule) -> None:
    if callable(learning_rate):
        check_schedule_nonnegative("learning_rate", learning_rate)
    else:
        check_nonnegative("learning_rate", learning_rate)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent, step for step equal to ``torch.optim.SGD``.

    Args:
        learning_rate: a float, or a schedule ``count -> lr``.
        momentum: momentum factor in [0, 1); 0 disables momentum.
        dampening: dampening for momentum, in [0, 1].
        nesterov: Nesterov momentum (needs ``momentum > 0``, ``dampening == 0``).
        weight_decay: L2 penalty added to the gradient.

    Examples:
        >>> opt = sgd(0.1, momentum=0.9, nesterov=True)
    """
    _check_learning_rate(learning_rate)
    momentum = check_nonnegative("momentum", momentum)
    if momentum >= 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    nesterov = check_bool("nesterov", nesterov)
    if nesterov and momentum == 0.0:
        raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum}")
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    dampening = check_number("dampening", dampening)
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum > 0.0:
        parts.append(trace(momentum, dampening=dampening, nesterov=nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adam, step for step equal to ``torch.optim.Adam`` (L2 weight decay).

    Examples:
        >>> opt = adam(1e-3)
    """
    _check_learning_rate(learning_rate)
    parts = (
        [add_decayed_weights(weight_decay)]
        if check_nonnegative("weight_decay", weight_decay)
        else []
    )
    parts += [scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate)]
    return chain(*parts)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.01,
) -> GradientTransformation:
    """AdamW, step for step equal to ``torch.optim.AdamW`` (decoupled weight decay).

    The decay is scaled by the learning rate, as in PyTorch:
    ``w <- w * (1 - lr * weight_decay) - lr * adam_update``.

    Examples:
        >>> opt = adamw(1e-3, weight_decay=0.05)
    """
    _check_learning_rate(learning_rate)
    return chain(
        scale_by_adam(b1, b2, eps),
        scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(learning_rate, weight_decay),
    )
