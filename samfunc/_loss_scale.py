"""Dynamic loss scaling for float16 training: the functional ``torch.amp.GradScaler``.

A loss scale multiplies the loss before the backward pass so that small float16
gradients do not underflow, and divides the gradients by it afterwards. The
dynamic rule is GradScaler's: a step whose gradients hold an ``inf`` or a
``NaN`` is skipped and the scale is multiplied by ``backoff_factor``; after
``growth_interval`` finite steps in a row it is multiplied by
``growth_factor``. The scale and the count of finite steps live in a
``LossScaleState`` of tensors, updated out of place with tensor ops only (no
``.item()``, no Python branch on a value), so a step that uses them compiles
with ``torch.compile(fullgraph=True)`` and never synchronizes with the device.

Examples:
    >>> import torch
    >>> loss_scale = dynamic_loss_scale(init_scale=1024.0, growth_interval=2)
    >>> state = loss_scale.init()
    >>> w = torch.tensor([1.0, 2.0])
    >>> grads = torch.func.grad(lambda p: scale_loss((p**2).sum(), state))(w)
    >>> grads, finite = unscale_grads(grads, state)
    >>> grads, bool(finite)
    (tensor([2., 4.]), True)
    >>> state = loss_scale.update(state, finite)
    >>> state = loss_scale.update(state, finite)  # two finite steps: the scale grows
    >>> float(state.scale)
    2048.0
    >>> float(loss_scale.update(state, torch.tensor(False)).scale)  # a skipped step
    1024.0
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import torch

from . import _tree
from ._tree import PyTree
from ._validate import check_number, check_positive, check_positive_int

__all__ = [
    "LossScaleState",
    "LossScaleInitFn",
    "LossScaleUpdateFn",
    "DynamicLossScale",
    "dynamic_loss_scale",
    "scale_loss",
    "unscale_grads",
    "unscaled",
]

#: The growth tracker is an int32 tensor, as GradScaler's ``_growth_tracker``.
_MAX_GROWTH_INTERVAL = 2**31 - 1
_FLOAT32_MAX = torch.finfo(torch.float32).max


class LossScaleState(NamedTuple):
    """State of a dynamic loss scale.

    Attributes:
        scale: the current scale, a float32 0-d tensor.
        growth_tracker: finite steps since the scale last changed, an int32
            0-d tensor (GradScaler's ``_growth_tracker``).
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor


class LossScaleInitFn(Protocol):
    """Builds the initial ``LossScaleState`` on ``device``."""

    def __call__(self, device: torch.device | str | None = None) -> LossScaleState: ...


class LossScaleUpdateFn(Protocol):
    """Returns the next ``LossScaleState``, given whether this step's gradients were finite."""

    def __call__(self, state: LossScaleState, finite: torch.Tensor) -> LossScaleState: ...


class DynamicLossScale(NamedTuple):
    """A dynamic loss scale: ``init`` and ``update``, built by ``dynamic_loss_scale``.

    Attributes:
        init: ``init(device=None) -> state``.
        update: ``update(state, finite) -> new_state``, where ``finite`` is a
            0-d bool tensor, True when every gradient of the step was finite.
    """

    init: LossScaleInitFn
    update: LossScaleUpdateFn


def _wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype GradScaler's kernels multiply the float32 scale in: double, but not on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def dynamic_loss_scale(
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> DynamicLossScale:
    """GradScaler's dynamic loss scale, as a pair of pure functions.

    ``update(state, finite)`` follows ``torch._amp_update_scale_`` exactly.
    When ``finite`` is False the scale is multiplied by ``backoff_factor`` and
    the tracker goes back to 0. When it is True the tracker goes up by one,
    and when it reaches ``growth_interval`` the scale is multiplied by
    ``growth_factor`` (unless that would overflow float32, in which case the
    scale stays) and the tracker goes back to 0. Products are taken in float64
    and rounded to float32, as in PyTorch's kernels, so the scale matches
    GradScaler's bit for bit.

    Args:
        init_scale: the first scale; positive, and finite in float32.
        growth_factor: multiplies the scale after ``growth_interval`` finite
            steps in a row; > 1.
        backoff_factor: multiplies the scale after a non-finite step; in (0, 1).
        growth_interval: how many finite steps in a row make the scale grow;
            an int >= 1.

    Returns:
        A ``DynamicLossScale(init, update)``.

    Examples:
        >>> import torch
        >>> loss_scale = dynamic_loss_scale(init_scale=8.0, growth_interval=1)
        >>> state = loss_scale.update(loss_scale.init(), torch.tensor(True))
        >>> state
        LossScaleState(scale=tensor(16.), growth_tracker=tensor(0, dtype=torch.int32))
    """
    init_scale = check_positive("init_scale", init_scale)
    if not 0.0 < float(torch.tensor(init_scale, dtype=torch.float32)) <= _FLOAT32_MAX:
        raise ValueError(
            f"init_scale must be positive and finite in float32 (the scale is float32), "
            f"got {init_scale}"
        )
    growth_factor = check_number("growth_factor", growth_factor)
    if growth_factor <= 1.0:
        raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
    backoff_factor = check_number("backoff_factor", backoff_factor)
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
    growth_interval = check_positive_int("growth_interval", growth_interval)
    if growth_interval > _MAX_GROWTH_INTERVAL:
        raise ValueError(
            f"growth_interval must be <= {_MAX_GROWTH_INTERVAL} (the tracker is int32), "
            f"got {growth_interval}"
        )
    return DynamicLossScale(
        functools.partial(_loss_scale_init, init_scale=init_scale),
        functools.partial(
            _loss_scale_update,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
        ),
    )


def _loss_scale_init(
    device: torch.device | str | None = None, *, init_scale: float
) -> LossScaleState:
    """The ``init`` of ``dynamic_loss_scale``: ``init_scale`` and a zero tracker."""
    return LossScaleState(
        scale=torch.full((), init_scale, dtype=torch.float32, device=device),
        growth_tracker=torch.zeros((), dtype=torch.int32, device=device),
    )


def _loss_scale_update(
    state: LossScaleState,
    finite: torch.Tensor,
    *,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> LossScaleState:
    """The ``update`` of ``dynamic_loss_scale``: GradScaler's rule (see there)."""
    if not isinstance(finite, torch.Tensor) or finite.dtype != torch.bool:
        got = f"dtype {finite.dtype}" if isinstance(finite, torch.Tensor) else repr(finite)
        raise TypeError(
            f"finite must be a bool tensor, True when the gradients were finite, got {got}"
        )
    if finite.ndim != 0:
        raise ValueError(f"finite must be a 0-d tensor, got shape {tuple(finite.shape)}")
    scale, tracker = state.scale, state.growth_tracker
    finite = finite.to(scale.device)
    wide = scale.to(_wide_dtype(scale.device))
    grown = (wide * growth_factor).to(torch.float32)
    backed_off = (wide * backoff_factor).to(torch.float32)
    counted = tracker + 1
    grow = finite & (counted == growth_interval)
    # Growth that would overflow float32 leaves the scale where it is.
    grown = torch.where(torch.isfinite(grown), grown, scale)
    new_scale = torch.where(finite, torch.where(grow, grown, scale), backed_off)
    new_tracker = torch.where(finite & ~grow, counted, torch.zeros_like(counted))
    return LossScaleState(scale=new_scale, growth_tracker=new_tracker)


def scale_loss(loss: torch.Tensor, state: LossScaleState) -> torch.Tensor:
    """``loss * scale``, in the loss's dtype; differentiate this instead of the loss.

    The product is GradScaler's (``loss * scale``, the float32 scale moved to
    the loss's device), cast back to ``loss.dtype``. For a float32 loss, or a
    loss with dimensions, that is exactly ``GradScaler.scale(loss)``; for a
    0-d float16 or bfloat16 loss, where GradScaler returns float32, the cast
    is the difference.

    Examples:
        >>> import torch
        >>> state = dynamic_loss_scale(init_scale=4.0).init()
        >>> scale_loss(torch.tensor(1.5), state)
        tensor(6.)
    """
    scaled = loss * state.scale.to(device=loss.device)
    return scaled.to(loss.dtype)


def unscale_grads(grads: PyTree, state: LossScaleState) -> tuple[PyTree, torch.Tensor]:
    """Divides scaled gradients by the scale, and says whether they were all finite.

    Each leaf is multiplied by ``1 / scale``, the reciprocal taken in float64
    and rounded to float32 as in ``GradScaler.unscale_``, so the results are
    GradScaler's bit for bit; the inputs are not modified. ``finite`` is read
    from the gradients as given, element by element: a leaf with a large but
    finite element is finite.

    Args:
        grads: a pytree of gradient tensors, computed from ``scale_loss``.
        state: the ``LossScaleState`` the loss was scaled with.

    Returns:
        ``(unscaled_grads, finite)``: a tree like ``grads``, and a 0-d bool
        tensor on the scale's device, True when every element of every leaf is
        finite. Pass ``finite`` to ``DynamicLossScale.update``, and skip the
        optimizer step when it is False (with ``torch.where`` to stay
        compile-safe).

    Examples:
        >>> import torch
        >>> state = dynamic_loss_scale(init_scale=4.0).init()
        >>> unscale_grads({"w": torch.tensor([4.0, float("inf")])}, state)
        ({'w': tensor([1., inf])}, tensor(False))
    """
    finite = _tree.all_finite(grads).to(state.scale.device)
    return unscaled(grads, state), finite


def unscaled(grads: PyTree, state: LossScaleState) -> PyTree:
    """``grads`` times ``1 / scale`` as GradScaler computes it (no finite check).

    Examples:
        >>> import torch
        >>> unscaled({"w": torch.tensor([4.0])}, dynamic_loss_scale(init_scale=4.0).init())
        {'w': tensor([1.])}
    """
    scale = state.scale
    if scale.device.type == "mps":
        inv_scale = scale.reciprocal()
    else:
        inv_scale = scale.double().reciprocal().float()
    return _tree.scale(grads, inv_scale)
