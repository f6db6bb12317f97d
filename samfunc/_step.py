"""Whole train steps, pure and ready for ``torch.compile(fullgraph=True)``.

``make_train_step`` (any ``loss_fn(params, batch)``) and
``make_module_train_step`` (an ``nn.Module`` and a criterion, with buffers)
return ``step(state, batch) -> (new_state, metrics)``. Everything that changes
from step to step (the step count, the learning rate from a schedule, rho from
a schedule) is a tensor in ``state``, so a compiled step neither breaks its
graph nor recompiles as training goes on.

Example:
    >>> import torch
    >>> import samfunc
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = samfunc.sgd(0.1, momentum=0.9)
    >>> step = samfunc.make_module_train_step(model, torch.nn.functional.cross_entropy, opt)
    >>> state = samfunc.init_train_state(model, opt)
    >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> state, metrics = step(state, batch)
    >>> int(state.step)
    1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import torch

from . import _tree
from ._base import GradientTransformation, OptState, Schedule
from ._finite import (
    NonFinitePolicy,
    check_policy,
    raise_if_nonfinite,
    refuse_raise_under_compile,
)
from ._grad import grad_and_value
from ._loss_scale import DynamicLossScale, LossScaleState, scale_loss, unscale_grads
from ._module import ModuleAux, mean_over_parts, module_loss, module_state
from ._sam import Norm, _Options, _run, checked_loss_fn
from ._schedule import check_schedule_nonnegative
from ._transform import init_count
from ._tree import Mask, PyTree
from ._update import apply_updates
from ._validate import check_bool, check_nonnegative, guard_radius

__all__ = [
    "TrainState",
    "StepMetrics",
    "init_train_state",
    "make_train_step",
    "make_module_train_step",
]

RhoOrSchedule = Union[float, Schedule]

#: What a train step does with a non-finite gradient; see ``samfunc._finite``.
STEP_POLICIES = ("skip", "raise", "propagate")


class TrainState(NamedTuple):
    """Everything a train step reads and returns.

    Attributes:
        params: the trainable parameters (a pytree).
        opt_state: the optimizer's state.
        buffers: the module's buffers (``{}`` for a plain loss function).
        step: the number of steps taken (skipped ones included), an int64 0-d tensor.
        loss_scale: the dynamic loss scale's state when the step scales the
            loss (``init_train_state(..., loss_scale=...)``), else ``()``: an
            empty tuple has no leaves, so ``tree_map`` over a state only meets
            tensors.
    """

    params: PyTree
    opt_state: OptState
    buffers: PyTree
    step: torch.Tensor
    loss_scale: Union[LossScaleState, tuple[()]] = ()


class StepMetrics(NamedTuple):
    """What a step reports.

    Attributes:
        loss: the loss at ``w``, before the update (SAM's first pass).
        grad_norm: the global L2 norm of the gradient given to the optimizer.
        rho: the radius used in this step.
        output: the module's detached output for this batch
            (``make_module_train_step`` only; ``None`` otherwise).
        finite: a 0-d bool tensor, False when the gradient had a NaN or inf
            element (read from ``grad_norm``, so also when that float32 norm
            overflows: elements beyond ~1e19; with ``loss_scale``, element by
            element, as ``torch.amp.GradScaler``). With ``nonfinite="skip"`` the
            step was then skipped: params, buffers and optimizer state came back
            unchanged (``state.step`` still counts the attempt, so a rho
            schedule moves on).
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    rho: torch.Tensor
    output: Any = None
    finite: Any = None


def init_train_state(
    params_or_module: PyTree | torch.nn.Module,
    optimizer: GradientTransformation,
    buffers: PyTree | None = None,
    *,
    loss_scale: DynamicLossScale | None = None,
) -> TrainState:
    """Builds the first ``TrainState`` from params (or a module) and an optimizer.

    Pass the step's ``loss_scale`` (``samfunc.dynamic_loss_scale()``) when the
    step scales the loss, so the state carries the scale from the start.

    Example:
        >>> import torch
        >>> import samfunc
        >>> state = samfunc.init_train_state({"w": torch.zeros(3)}, samfunc.sgd(0.1))
    """
    if isinstance(params_or_module, torch.nn.Module):
        params, module_buffers = module_state(params_or_module)
        buffers = module_buffers if buffers is None else buffers
    else:
        params = params_or_module
        _tree.check_detached(params, "params")
    step = init_count(params)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        buffers={} if buffers is None else buffers,
        step=step,
        loss_scale=() if loss_scale is None else loss_scale.init(step.device),
    )


def _check_rho(rho: RhoOrSchedule) -> RhoOrSchedule:
    if callable(rho):
        return check_schedule_nonnegative("rho", rho)
    return check_nonnegative("rho", rho)


def _rho_at(rho: RhoOrSchedule, step: torch.Tensor) -> tuple[float | torch.Tensor, torch.Tensor]:
    """The radius for this step, as given to ``sam_grad`` and as a metric tensor.

    A constant rho stays a Python float for ``sam_grad`` (a float32 tensor would
    round it, which float64 training would notice).
    """
    if callable(rho):
        # A user's schedule may still go negative or NaN: that becomes NaN here,
        # so the step's non-finite policy sees it (no device sync).
        value = guard_radius(rho(step))
        return value, value
    # ones * rho, not torch.full: under torch.compile a float that became symbolic
    # (it changed between compilations) was baked into torch.full's output as a
    # constant (torch 2.13), so the metric went stale while the maths stayed right.
    return rho, torch.ones((), dtype=torch.float32, device=step.device) * rho


class _SamSettings(NamedTuple):
    sam: bool
    rho: RhoOrSchedule
    options: _Options
    nonfinite: NonFinitePolicy
    loss_scale: DynamicLossScale | None


def _settings(
    sam: bool,
    rho: RhoOrSchedule,
    adaptive: bool | Mask,
    eta: float,
    norm: Norm,
    mask: Mask | None,
    num_chunks: int,
    accum_steps: int,
    vectorize_chunks: bool,
    nonfinite: str,
    loss_scale: DynamicLossScale | None,
) -> _SamSettings:
    """Checks every option once, when the step is built, never inside it."""
    rho = _check_rho(rho)
    policy = check_policy("nonfinite", nonfinite, STEP_POLICIES)
    if loss_scale is not None:
        if not isinstance(loss_scale, DynamicLossScale):
            raise TypeError(
                "loss_scale must come from samfunc.dynamic_loss_scale(), "
                f"got {type(loss_scale).__name__}"
            )
        if policy != "skip":
            raise ValueError(
                "loss_scale skips steps with an inf or NaN gradient by design (the scale backs "
                f"off and the step is retried), so it needs nonfinite='skip', got {policy!r}"
            )
    options = _Options(
        0.0,
        adaptive,
        eta,
        norm,
        mask,
        num_chunks,
        accum_steps,
        vectorize_chunks=vectorize_chunks,
        nonfinite="raise" if policy == "raise" else "propagate",
    )
    return _SamSettings(
        sam=check_bool("sam", sam),
        rho=rho,
        options=options,
        nonfinite=policy,
        loss_scale=loss_scale,
    )


def _passes(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: Any,
    settings: _SamSettings,
    rho: float | torch.Tensor,
    has_aux: bool,
) -> tuple[PyTree, Any]:
    """SAM's two passes, or one plain gradient pass with ``sam=False``."""
    if settings.sam:  # _run applies settings.options.nonfinite itself
        return _run(loss_fn, params, batch, settings.options, rho, has_aux)
    if settings.nonfinite == "raise":
        refuse_raise_under_compile()
    grad_fn = grad_and_value(checked_loss_fn(loss_fn, has_aux), has_aux=has_aux)
    grads, value = grad_fn(params, batch)
    if settings.nonfinite == "raise":
        raise_if_nonfinite(grads, "the gradient pass", value[0] if has_aux else value)
    return grads, value


class _Gradient(NamedTuple):
    grads: PyTree
    value: Any
    finite: torch.Tensor | None  # None: read it from the gradient's norm


def _scaled_loss(
    loss_fn: Callable[..., Any], scale: LossScaleState, has_aux: bool
) -> Callable[..., Any]:
    """``loss_fn`` with its loss multiplied by the scale; the true loss rides along as aux."""

    def scaled(params: PyTree, batch: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
        out = loss_fn(params, batch)
        loss, aux = out if has_aux else (out, None)
        return scale_loss(loss, scale), (loss.detach(), aux)

    return scaled


def _gradient(
    loss_fn: Callable[..., Any],
    state: TrainState,
    batch: Any,
    settings: _SamSettings,
    rho: float | torch.Tensor,
    has_aux: bool,
) -> _Gradient:
    """The step's gradient and loss (value), unscaled, and whether the gradient is finite."""
    if settings.loss_scale is None:
        grads, value = _passes(loss_fn, state.params, batch, settings, rho, has_aux)
        return _Gradient(grads, value, None)
    scale = state.loss_scale
    if not isinstance(scale, LossScaleState):
        raise ValueError(
            "this step scales the loss, but state.loss_scale is empty: build the state with "
            "init_train_state(..., loss_scale=the same dynamic_loss_scale())"
        )
    # A normalized ascent (l2, inf) ignores the scale of g; the unnormalized one does not.
    radius = rho / scale.scale if settings.options.norm == "none" else rho
    scaled = _scaled_loss(loss_fn, scale, has_aux)
    grads, (_, (loss, aux)) = _passes(scaled, state.params, batch, settings, radius, True)
    grads, finite = unscale_grads(grads, scale)
    loss = loss.mean() if loss.ndim else loss  # one loss per chunk or micro-batch: the mean
    return _Gradient(grads, (loss, aux) if has_aux else loss, finite)


class _Updated(NamedTuple):
    state: TrainState
    grad_norm: torch.Tensor
    finite: torch.Tensor


def _update(
    optimizer: GradientTransformation,
    settings: _SamSettings,
    state: TrainState,
    gradient: _Gradient,
    buffers: PyTree,
) -> _Updated:
    """The optimizer's update; with ``"skip"``, the old state where the gradient is not finite."""
    grads = gradient.grads
    grad_norm = _tree.global_norm(grads)
    # The norm is reported anyway; it is finite exactly when every element is, unless
    # the float32 norm itself overflows (elements beyond ~1e19), a step no one can use.
    finite = torch.isfinite(grad_norm) if gradient.finite is None else gradient.finite
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_updates(state.params, updates)
    if settings.nonfinite == "skip":
        params = _tree.where(finite, params, state.params)
        opt_state = _tree.where(finite, opt_state, state.opt_state)
        buffers = _tree.where(finite, buffers, state.buffers)
    loss_scale = state.loss_scale
    if settings.loss_scale is not None and isinstance(loss_scale, LossScaleState):
        loss_scale = settings.loss_scale.update(loss_scale, finite)
    new_state = TrainState(params, opt_state, buffers, state.step + 1, loss_scale)
    return _Updated(new_state, grad_norm, finite)


def make_train_step(
    loss_fn: Callable[[PyTree, Any], torch.Tensor],
    optimizer: GradientTransformation,
    *,
    sam: bool = True,
    rho: RhoOrSchedule = 0.05,
    adaptive: bool | Mask = False,
    eta: float = 0.0,
    norm: Norm = "l2",
    mask: Mask | None = None,
    num_chunks: int = 1,
    accum_steps: int = 1,
    vectorize_chunks: bool = True,
    nonfinite: NonFinitePolicy = "skip",
    loss_scale: DynamicLossScale | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """A pure SAM train step for ``loss_fn(params, batch) -> scalar loss``.

    Args:
        loss_fn: the loss, a function of the params and a batch.
        optimizer: the ``GradientTransformation`` that turns gradients into updates.
        sam: False for the plain-gradient baseline (one pass, same pipeline).
        rho: a float, or a schedule ``step -> rho`` (a 0-d tensor).
        adaptive: see ``sam_grad``.
        eta: see ``sam_grad``.
        norm: see ``sam_grad``.
        mask: see ``sam_grad``.
        num_chunks: see ``sam_grad``.
        accum_steps: see ``sam_grad``.
        vectorize_chunks: see ``sam_grad``.
        nonfinite: a gradient with a NaN or inf element (in either pass, or
            from a rho schedule that went negative or NaN): ``"skip"`` (default)
            returns the state unchanged and ``metrics.finite`` False, as
            ``torch.amp.GradScaler`` skips a step; ``"raise"`` raises
            ``NonFiniteGradientError`` naming the pass (eager only);
            ``"propagate"`` applies it.
        loss_scale: dynamic loss scaling for float16 training, the functional
            ``torch.amp.GradScaler``: ``samfunc.dynamic_loss_scale()``. Both
            passes run on the loss times the scale (from ``state.loss_scale``;
            build the state with ``init_train_state(..., loss_scale=...)``),
            the gradient is unscaled once, and a step with an inf or NaN is
            skipped while the scale backs off. Needs ``nonfinite="skip"``.

    Returns:
        ``step(state, batch) -> (new_state, StepMetrics)``; wrap it in
        ``torch.compile(step, fullgraph=True)`` for speed.

    Example:
        >>> import torch
        >>> import samfunc
        >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
        >>> opt = samfunc.sgd(0.1)
        >>> step = samfunc.make_train_step(loss_fn, opt, rho=0.05)
        >>> state = samfunc.init_train_state({"w": torch.ones(3)}, opt)
        >>> state, metrics = step(state, torch.randn(8, 3))
    """
    settings = _settings(
        sam,
        rho,
        adaptive,
        eta,
        norm,
        mask,
        num_chunks,
        accum_steps,
        vectorize_chunks,
        nonfinite,
        loss_scale,
    )

    def step(state: TrainState, batch: Any) -> tuple[TrainState, StepMetrics]:
        rho_now, rho_metric = _rho_at(settings.rho, state.step)
        gradient = _gradient(loss_fn, state, batch, settings, rho_now, has_aux=False)
        new = _update(optimizer, settings, state, gradient, state.buffers)
        metrics = StepMetrics(gradient.value, new.grad_norm, rho_metric, finite=new.finite)
        return new.state, metrics

    return step


def _merge_parts(aux: ModuleAux, parts: int) -> ModuleAux:
    """Buffers and outputs stacked over chunks or micro-batches, back to one batch."""
    if parts == 1:
        return aux
    output = _tree.tree_map(lambda o: o.reshape(-1, *o.shape[2:]), aux.output)
    return ModuleAux(buffers=mean_over_parts(aux.buffers), output=output)


def make_module_train_step(
    module: torch.nn.Module,
    criterion: Callable[[Any, Any], torch.Tensor],
    optimizer: GradientTransformation,
    *,
    sam: bool = True,
    rho: RhoOrSchedule = 0.05,
    adaptive: bool | Mask = False,
    eta: float = 0.0,
    norm: Norm = "l2",
    mask: Mask | None = None,
    num_chunks: int = 1,
    accum_steps: int = 1,
    vectorize_chunks: bool = True,
    nonfinite: NonFinitePolicy = "skip",
    loss_scale: DynamicLossScale | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """A pure SAM train step for an ``nn.Module``, with its buffers threaded through.

    ``batch`` is ``(inputs, targets)`` and the loss is ``criterion(module(inputs),
    targets)`` (see ``module_loss``). The new buffers (BatchNorm running
    statistics) come from the first, unperturbed pass; with ``num_chunks`` or
    ``accum_steps`` they are averaged over the parts (see ``mean_over_parts``).
    BatchNorm in training mode needs ``vectorize_chunks=False`` with
    ``num_chunks > 1``. The other arguments are those of ``make_train_step``.

    Example:
        >>> import torch
        >>> import samfunc
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> opt = samfunc.sgd(0.1)
        >>> step = samfunc.make_module_train_step(model, torch.nn.functional.mse_loss, opt)
        >>> state = samfunc.init_train_state(model, opt)
        >>> state, metrics = step(state, (torch.randn(16, 4), torch.randn(16, 8)))
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    settings = _settings(
        sam,
        rho,
        adaptive,
        eta,
        norm,
        mask,
        num_chunks,
        accum_steps,
        vectorize_chunks,
        nonfinite,
        loss_scale,
    )
    parts = num_chunks * accum_steps if settings.sam else 1

    def step(state: TrainState, batch: Any) -> tuple[TrainState, StepMetrics]:
        rho_now, rho_metric = _rho_at(settings.rho, state.step)
        loss_fn = module_loss(module, criterion, state.buffers)
        gradient = _gradient(loss_fn, state, batch, settings, rho_now, True)
        loss, aux = gradient.value
        aux = _merge_parts(aux, parts)
        new = _update(optimizer, settings, state, gradient, aux.buffers)
        metrics = StepMetrics(loss, new.grad_norm, rho_metric, aux.output, new.finite)
        return new.state, metrics

    return step
