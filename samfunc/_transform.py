"""Small gradient transformations; optimizers are ``chain``s of these.

Each function checks its hyperparameters once and returns a
``GradientTransformation``. Arithmetic runs on all leaves at once with
``torch._foreach_*`` ops; nothing is modified in place.

Examples:
    >>> import torch
    >>> import samfunc
    >>> clip = samfunc.clip_by_global_norm(1.0)
    >>> grads = {"w": torch.tensor([3.0, 4.0])}
    >>> clipped, _ = clip.update(grads, clip.init(grads))
    >>> clipped["w"]
    tensor([0.6000, 0.8000])
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from . import _tree
from ._base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
    check_state,
)
from ._schedule import check_schedule_nonnegative
from ._validate import (
    check_bool,
    check_in_interval,
    check_nonnegative,
    check_number,
    check_positive,
)

__all__ = [
    "ScaleByScheduleState",
    "TraceState",
    "ScaleByAdamState",
    "identity",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "ScaleByLearningRateState",
    "trace",
    "scale_by_adam",
    "add_decayed_weights",
    "clip_by_global_norm",
    "decoupled_weight_decay",
    "DecoupledWeightDecayState",
    "init_count",
]

#: torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
_CLIP_EPS = 1e-6


class ScaleByScheduleState(NamedTuple):
    """State of ``scale_by_schedule``: the number of updates done so far."""

    step: torch.Tensor


class TraceState(NamedTuple):
    """State of ``trace``: the step count and the momentum buffers."""

    step: torch.Tensor
    momentum_buffer: Updates


class ScaleByAdamState(NamedTuple):
    """State of ``scale_by_adam``: the step count and both moment estimates."""

    step: torch.Tensor
    mu: Updates
    nu: Updates


def init_count(params: Params) -> torch.Tensor:
    """Returns a zero int64 step counter on the device of the first leaf."""
    first = _tree.leaves(params)
    device = first[0].device if first else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _empty_init(params: Params) -> EmptyState:
    """The ``init`` of every stateless transformation."""
    del params
    return EmptyState()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is a 16-bit float, else ``t`` itself (no copy)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _scalar_dtype(device: torch.device) -> torch.dtype:
    """The most precise float dtype for per-step scalars on ``device``."""
    return torch.float32 if device.type == "mps" else torch.float64


def identity() -> GradientTransformation:
    """Returns updates unchanged."""
    return GradientTransformation(_empty_init, _identity_update)


def _identity_update(
    updates: Updates, state: OptState, params: Optional[Params] = None
) -> tuple[Updates, OptState]:
    """The ``update`` of ``identity``."""
    del params
    return updates, state


def scale(step_size: float) -> GradientTransformation:
    """Multiplies updates by a fixed ``step_size``.

    Examples:
        >>> import torch
        >>> t = scale(-2.0)
        >>> t.update([torch.ones(1)], t.init(None))[0]
        [tensor([-2.])]
    """
    step_size = check_number("step_size", step_size)
    return GradientTransformation(
        _empty_init, functools.partial(_scale_update, step_size=step_size)
    )


def _scale_update(
    updates: Updates, state: OptState, params: Optional[Params] = None, *, step_size: float
) -> tuple[Updates, OptState]:
    """The ``update`` of ``scale``."""
    del params
    return _tree.scale(updates, step_size), state


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``, then increments the count.

    The count is an int64 0-d tensor in state, so a compiled step that calls
    this does not recompile as it grows.
    """
    if not callable(step_size_fn):
        raise TypeError(f"step_size_fn must be callable, got {step_size_fn!r}")
    return GradientTransformation(
        _count_init, functools.partial(_scale_by_schedule_update, step_size_fn=step_size_fn)
    )


def _count_init(params: Params) -> ScaleByScheduleState:
    """The ``init`` of ``scale_by_schedule``: a zero count."""
    return ScaleByScheduleState(step=init_count(params))


def _scale_by_schedule_update(
    updates: Updates,
    state: OptState,
    params: Optional[Params] = None,
    *,
    step_size_fn: Schedule,
) -> tuple[Updates, OptState]:
    """The ``update`` of ``scale_by_schedule``."""
    del params
    check_state("scale_by_schedule", state, ScaleByScheduleState)
    step_size = step_size_fn(state.step)
    return _tree.scale(updates, step_size), ScaleByScheduleState(step=state.step + 1)


class ScaleByLearningRateState(NamedTuple):
    """State of ``scale_by_learning_rate``.

    Attributes:
        step: the number of updates done so far (a schedule's argument).
        learning_rate: the learning rate of the last update (float32; 0
            before the first), which the train steps report in ``StepMetrics``.
    """

    step: torch.Tensor
    learning_rate: torch.Tensor


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (a float or a schedule of the count).

    The state keeps the learning rate each update used
    (``ScaleByLearningRateState``), so a train step reports it.

    Examples:
        >>> import torch
        >>> t = scale_by_learning_rate(0.1)
        >>> updates, state = t.update([torch.ones(1)], t.init([torch.ones(1)]))
        >>> updates, state.learning_rate
        ([tensor([-0.1000])], tensor(0.1000))
    """
    sign = -1.0 if check_bool("flip_sign", flip_sign) else 1.0
    if callable(learning_rate):
        schedule = check_schedule_nonnegative("learning_rate", learning_rate)
        update = functools.partial(_learning_rate_update, sign=sign, schedule=schedule)
    else:
        rate = check_nonnegative("learning_rate", learning_rate)
        update = functools.partial(_learning_rate_update, sign=sign, constant=rate)
    return GradientTransformation(_learning_rate_init, update)


def _learning_rate_init(params: Params) -> ScaleByLearningRateState:
    """The ``init`` of ``scale_by_learning_rate``: a zero count, no learning rate yet (0)."""
    step = init_count(params)
    return ScaleByLearningRateState(step, torch.zeros((), device=step.device))


def _learning_rate_update(
    updates: Updates,
    state: OptState,
    params: Optional[Params] = None,
    *,
    sign: float,
    schedule: Optional[Schedule] = None,
    constant: Optional[float] = None,
) -> tuple[Updates, OptState]:
    """The ``update`` of ``scale_by_learning_rate``."""
    del params
    check_state("scale_by_learning_rate", state, ScaleByLearningRateState)
    rate = constant if schedule is None else schedule(state.step)
    assert rate is not None
    shown = _tree.scalar_like(state.learning_rate, rate)
    return _tree.scale(updates, sign * rate), ScaleByLearningRateState(state.step + 1, shown)


def trace(
    decay: float, *, dampening: float = 0.0, nesterov: bool = False
) -> GradientTransformation:
    """Momentum, with PyTorch's conventions (``torch.optim.SGD``).

    ``buf = g`` on the first step and ``buf = decay * buf + (1 - dampening) * g``
    after; the update is ``buf``, or ``g + decay * buf`` with ``nesterov``.

    Examples:
        >>> import torch
        >>> t = trace(0.9)
        >>> state = t.init([torch.zeros(1)])
        >>> u, state = t.update([torch.ones(1)], state)
        >>> u, _ = t.update([torch.ones(1)], state)
        >>> u
        [tensor([1.9000])]
    """
    decay = check_in_interval("momentum", decay, 0.0, 1.0)
    nesterov = check_bool("nesterov", nesterov)
    dampening = check_number("dampening", dampening)
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    if nesterov and (decay <= 0.0 or dampening != 0.0):
        raise ValueError(
            f"nesterov=True needs momentum > 0 and dampening == 0, "
            f"got momentum={decay} and dampening={dampening}"
        )
    return GradientTransformation(
        _trace_init,
        functools.partial(_trace_update, decay=decay, dampening=dampening, nesterov=nesterov),
    )


def _trace_init(params: Params) -> TraceState:
    """The ``init`` of ``trace``: a zero count and zero buffers."""
    return TraceState(step=init_count(params), momentum_buffer=_tree.zeros_like(params))


def _trace_update(
    updates: Updates,
    state: OptState,
    params: Optional[Params] = None,
    *,
    decay: float,
    dampening: float,
    nesterov: bool,
) -> tuple[Updates, OptState]:
    """The ``update`` of ``trace``."""
    del params
    check_state("trace (momentum)", state, TraceState)
    _tree.check_same_shapes(state.momentum_buffer, updates, "the optimizer state", "updates")
    grads, spec = _tree.flatten(updates)
    buffers = _tree.leaves(state.momentum_buffer)
    if dampening == 0.0:
        # With a zero initial buffer, decay * 0 + g is exactly g: no branch needed.
        new_buffers = torch._foreach_add(grads, buffers, alpha=decay)
    else:
        later = torch._foreach_add(torch._foreach_mul(buffers, decay), grads, alpha=1.0 - dampening)
        first = state.step == 0
        new_buffers = tuple(torch.where(first, g, b) for g, b in zip(grads, later))
    out = torch._foreach_add(grads, new_buffers, alpha=decay) if nesterov else new_buffers
    new_state = TraceState(step=state.step + 1, momentum_buffer=_tree.unflatten(new_buffers, spec))
    return _tree.unflatten(out, spec), new_state


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's bias-corrected rescaling, as in ``torch.optim.Adam``.

    ``mu`` and ``nu`` are exponential moving averages of ``g`` and ``g**2``;
    the update is ``(mu / (1 - b1**t)) / (sqrt(nu) / sqrt(1 - b2**t) + eps)``.
    For float16/bfloat16 leaves the moments and the arithmetic are float32 (the
    update is cast back): in float16, ``eps = 1e-8`` and ``g**2`` of a small
    gradient underflow to 0, and ``torch.optim.Adam`` returns NaN there.
    """
    b1 = check_in_interval("b1", b1, 0.0, 1.0)
    b2 = check_in_interval("b2", b2, 0.0, 1.0)
    eps = check_positive("eps", eps)
    return GradientTransformation(
        _adam_init, functools.partial(_adam_update, b1=b1, b2=b2, eps=eps)
    )


def _wide_zeros_like(p: torch.Tensor) -> torch.Tensor:
    """Zeros like ``p``, in float32 if ``p`` is a 16-bit float (Adam's moments)."""
    return torch.zeros_like(p, dtype=_wide(p).dtype)


def _adam_init(params: Params) -> ScaleByAdamState:
    """The ``init`` of ``scale_by_adam``: a zero count and zero moments."""
    return ScaleByAdamState(
        step=init_count(params),
        mu=_tree.tree_map(_wide_zeros_like, params),
        nu=_tree.tree_map(_wide_zeros_like, params),
    )


def _adam_update(
    updates: Updates,
    state: OptState,
    params: Optional[Params] = None,
    *,
    b1: float,
    b2: float,
    eps: float,
) -> tuple[Updates, OptState]:
    """The ``update`` of ``scale_by_adam``."""
    del params
    check_state("scale_by_adam", state, ScaleByAdamState)
    _tree.check_same_shapes(state.mu, updates, "the optimizer state", "updates")
    given, spec = _tree.flatten(updates)
    grads = [_wide(g) for g in given]
    new_step = state.step + 1
    mu = torch._foreach_lerp(_tree.leaves(state.mu), grads, 1.0 - b1)
    nu = torch._foreach_addcmul(
        torch._foreach_mul(_tree.leaves(state.nu), b2), grads, grads, value=1.0 - b2
    )
    # Bias corrections in float64 where the device has it: 1 - 0.999**t loses
    # four digits in float32, and torch.optim.Adam computes it in Python floats.
    step = new_step.to(_scalar_dtype(new_step.device))
    bias_correction1 = 1.0 - torch.pow(torch.full_like(step, b1), step)
    bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(torch.full_like(step, b2), step))
    denom = torch._foreach_add(
        torch._foreach_div(torch._foreach_sqrt(nu), bias_correction2_sqrt), eps
    )
    wide_out = torch._foreach_div(torch._foreach_div(mu, denom), bias_correction1)
    out = [o.to(g.dtype) for o, g in zip(wide_out, given)]
    new_state = ScaleByAdamState(
        step=new_step, mu=_tree.unflatten(mu, spec), nu=_tree.unflatten(nu, spec)
    )
    return _tree.unflatten(out, spec), new_state


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates (L2, or decoupled after Adam).

    Use ``samfunc.masked`` to decay only some leaves.
    """
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    return GradientTransformation(
        _empty_init, functools.partial(_add_decayed_weights_update, weight_decay=weight_decay)
    )


def _add_decayed_weights_update(
    updates: Updates, state: OptState, params: Optional[Params] = None, *, weight_decay: float
) -> tuple[Updates, OptState]:
    """The ``update`` of ``add_decayed_weights``."""
    if weight_decay == 0.0:
        return updates, state
    if params is None:
        raise ValueError("add_decayed_weights needs params: call update(updates, state, params)")
    _tree.check_same_shapes(params, updates, "params", "updates")
    return _tree.add_scaled(updates, params, weight_decay), state


class DecoupledWeightDecayState(NamedTuple):
    """State of ``decoupled_weight_decay``: the step count, for a schedule."""

    step: torch.Tensor


def decoupled_weight_decay(
    learning_rate: ScalarOrSchedule, weight_decay: float
) -> GradientTransformation:
    """AdamW's decay: adds ``params * (1 - lr * weight_decay) - params`` to the updates.

    This is ``-lr * weight_decay * params`` written the way ``torch.optim.AdamW``
    rounds it: the factor ``1 - lr * weight_decay`` is rounded to the
    parameters' dtype first. Since that factor is near 1,
    ``params * factor - params`` is exact, and ``apply_updates`` then lands on
    the same numbers as PyTorch's ``param.mul_(1 - lr * weight_decay)``.

    Examples:
        >>> import torch
        >>> t = decoupled_weight_decay(0.1, weight_decay=0.5)
        >>> params = [torch.ones(1)]
        >>> t.update([torch.zeros(1)], t.init(params), params)[0]
        [tensor([-0.0500])]
    """
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    if callable(learning_rate):
        check_schedule_nonnegative("learning_rate", learning_rate)
    else:
        check_nonnegative("learning_rate", learning_rate)
    return GradientTransformation(
        _decoupled_weight_decay_init,
        functools.partial(
            _decoupled_weight_decay_update, learning_rate=learning_rate, weight_decay=weight_decay
        ),
    )


def _decoupled_weight_decay_init(params: Params) -> DecoupledWeightDecayState:
    """The ``init`` of ``decoupled_weight_decay``: a zero count."""
    return DecoupledWeightDecayState(step=init_count(params))


def _decoupled_weight_decay_update(
    updates: Updates,
    state: OptState,
    params: Optional[Params] = None,
    *,
    learning_rate: ScalarOrSchedule,
    weight_decay: float,
) -> tuple[Updates, OptState]:
    """The ``update`` of ``decoupled_weight_decay``."""
    check_state("decoupled_weight_decay", state, DecoupledWeightDecayState)
    new_state = DecoupledWeightDecayState(step=state.step + 1)
    if weight_decay == 0.0:
        return updates, new_state
    if params is None:
        raise ValueError("decoupled_weight_decay needs params: call update(updates, state, params)")
    _tree.check_same_shapes(params, updates, "params", "updates")
    if callable(learning_rate):
        factor: float | torch.Tensor = 1.0 - learning_rate(state.step) * weight_decay
    else:
        factor = 1.0 - learning_rate * weight_decay
    param_leaves = _tree.leaves(params)
    decayed = torch._foreach_sub(torch._foreach_mul(param_leaves, factor), param_leaves)
    out, spec = _tree.flatten(updates)
    return _tree.unflatten(torch._foreach_add(out, decayed), spec), new_state


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescales updates so their global L2 norm is at most ``max_norm``.

    Only the magnitude changes, never the direction (every leaf gets the same
    factor ``min(1, max_norm / (norm + 1e-6))``, as in
    ``torch.nn.utils.clip_grad_norm_``).
    """
    max_norm = check_positive("max_norm", max_norm)
    return GradientTransformation(
        _empty_init, functools.partial(_clip_by_global_norm_update, max_norm=max_norm)
    )


def _clip_by_global_norm_update(
    updates: Updates, state: OptState, params: Optional[Params] = None, *, max_norm: float
) -> tuple[Updates, OptState]:
    """The ``update`` of ``clip_by_global_norm``."""
    del params
    norm = _tree.global_norm(updates)
    factor = torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)
    return _tree.scale(updates, factor), state
