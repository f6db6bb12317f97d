"""Whole train steps, pure and ready for ``torch.compile(fullgraph=True)``.

``make_train_step`` (any ``loss_fn(params, batch)``) and
``make_module_train_step`` (an ``nn.Module`` and a criterion, with buffers)
return ``step(state, batch) -> (new_state, metrics)``. Everything that changes
from step to step (the step count, the learning rate from a schedule, rho from
a schedule) is a tensor in ``state``, so a compiled step neither breaks its
graph nor recompiles as training goes on.

Examples:
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
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.utils._pytree as pytree
from typing_extensions import Unpack

from . import _tree
from ._ascent import ScaleByRadiusState
from ._base import (
    PARTS_OPTION_NAMES,
    SAM_OPTION_NAMES,
    GradientTransformation,
    Method,
    MethodState,
    OptState,
    PartsOptions,
    PassOptions,
    SamOptions,
    Schedule,
)
from ._choose import PLANNED, ChoosingStep, Kind, chooses
from ._distributed import all_mean, refuse_parallel_wrapper
from ._engine import FirstPass, MethodGrad, Pass, checked_loss_fn, mean_pass, run_options
from ._finite import (
    NonFinitePolicy,
    check_policy,
    raise_if_nonfinite,
    refuse_raise_under_compile,
)
from ._grad import grad_and_value
from ._loss_scale import DynamicLossScale, LossScaleState, scale_loss, unscale_grads
from ._methods import sam as sam_method
from ._module import ModuleAux, mean_over_parts, module_loss, module_state
from ._schedule import check_schedule_nonnegative
from ._transform import init_count
from ._tree import PyTree
from ._update import apply_updates
from ._validate import check_bool, check_nonnegative, guard_radius

__all__ = [
    "TrainState",
    "StepMetrics",
    "StepOptions",
    "init_train_state",
    "make_train_step",
    "make_module_train_step",
]

RhoOrSchedule = Union[float, Schedule]


class StepOptions(SamOptions, PartsOptions, total=False):
    """The options both train-step builders take.

    Attributes:
        method: the sharpness-aware method (``samfunc.gsam(...)``, ...); its
            state rides in ``state.method_state`` (build the state with
            ``init_train_state(..., method=method)``) and ``metrics.rho`` is
            the radius its ``scale_by_radius`` recorded (NaN if it has none).
            Default None: SAM shaped by ``rho``, ``adaptive``, ``eta``,
            ``norm`` and ``mask`` (``samfunc.SamOptions``; ``rho`` may also be
            a schedule ``step -> rho`` of ``state.step``). A method carries
            those itself; ``num_chunks``, ``accum_steps`` and
            ``vectorize_chunks`` (``samfunc.PartsOptions``) apply to any.
        sam: False for the plain-gradient baseline (one pass, same pipeline).
        nonfinite: a gradient with a NaN or inf element (in either pass, or
            from a rho schedule that went negative or NaN): ``"skip"`` (default)
            returns the state (method state included) unchanged and
            ``metrics.finite`` False, as ``torch.amp.GradScaler`` skips a step;
            ``"raise"`` raises ``NonFiniteGradientError`` naming the pass
            (eager only); ``"propagate"`` applies it.
        loss_scale: dynamic loss scaling for float16 training, the functional
            ``torch.amp.GradScaler``: ``samfunc.dynamic_loss_scale()``. Both
            passes run on the loss times the scale (from ``state.loss_scale``;
            build the state with ``init_train_state(..., loss_scale=...)``),
            the gradient is unscaled once, and a step with an inf or NaN is
            skipped while the scale backs off. Needs ``nonfinite="skip"``; not
            with a ``method`` yet.
    """

    method: Optional[Method]
    sam: bool
    nonfinite: NonFinitePolicy
    loss_scale: Optional[DynamicLossScale]


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
        method_state: the method's state when the step runs one
            (``init_train_state(..., method=...)``), else ``()``.
    """

    params: PyTree
    opt_state: OptState
    buffers: PyTree
    step: torch.Tensor
    loss_scale: Union[LossScaleState, tuple[()]] = ()
    method_state: Any = ()


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
    method: Optional[Method] = None,
) -> TrainState:
    """Builds the first ``TrainState`` from params (or a module) and an optimizer.

    Pass the step's ``loss_scale`` (``samfunc.dynamic_loss_scale()``) when the
    step scales the loss, and its ``method``, so the state carries their
    states from the start.

    Examples:
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
        method_state=() if method is None else _check_method(method).init(params),
    )


def _check_method(method: Any) -> Method:
    if not isinstance(method, Method):
        raise TypeError(
            f"method must be a samfunc.Method (samfunc.sam(), gsam(), ...), "
            f"got {type(method).__name__}"
        )
    return method


def _check_rho(rho: RhoOrSchedule) -> RhoOrSchedule:
    if callable(rho):
        return check_schedule_nonnegative("rho", rho)
    return check_nonnegative("rho", rho)


def _rho_at(rho: RhoOrSchedule, step: torch.Tensor) -> tuple[float | torch.Tensor, torch.Tensor]:
    """The radius for this step, as given to ``sam()`` and as a metric tensor.

    A constant rho stays a Python float for ``sam()`` (a float32 tensor would
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


def _radius_in(method_state: Any, device: torch.device) -> torch.Tensor:
    """The radius a method's state recorded (its first ``scale_by_radius``), else NaN."""
    found = [
        leaf
        for leaf in pytree.tree_leaves(
            method_state, is_leaf=lambda node: isinstance(node, ScaleByRadiusState)
        )
        if isinstance(leaf, ScaleByRadiusState)
    ]
    if found:
        return found[0].radius
    return torch.full((), float("nan"), dtype=torch.float32, device=device)


class _SamSettings(NamedTuple):
    sam: bool
    rho: RhoOrSchedule
    shape: dict[str, Any]  # sam()'s options besides rho (default method only)
    method: Optional[Method]
    engine: PassOptions
    nonfinite: NonFinitePolicy
    loss_scale: DynamicLossScale | None


def _settings(options: StepOptions) -> _SamSettings:
    """Checks every option once, when the step is built, never inside it."""
    known = SAM_OPTION_NAMES | PARTS_OPTION_NAMES | {"method", "sam", "nonfinite", "loss_scale"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unexpected option {unknown[0]!r}; the step's options are {sorted(known)}")
    sam = check_bool("sam", options.get("sam", True))
    method = options.get("method")
    loss_scale = options.get("loss_scale")
    policy = check_policy("nonfinite", options.get("nonfinite", "skip"), STEP_POLICIES)
    shape: dict[str, Any] = {
        k: v for k, v in options.items() if k in SAM_OPTION_NAMES and k != "rho"
    }
    engine: PassOptions = {k: v for k, v in options.items() if k in PARTS_OPTION_NAMES}  # type: ignore[assignment]
    engine["nonfinite"] = "raise" if policy == "raise" else "propagate"
    run_options(engine)  # type: ignore[arg-type]  # unknown names and bad values fail here
    rho = _check_rho(options.get("rho", 0.05))  # type: ignore[arg-type]
    if method is not None:
        method = _check_method(method)
        given = sorted(k for k in options if k in SAM_OPTION_NAMES)
        if given or not sam:
            raise ValueError(
                "with method=..., set rho, adaptive, eta, norm and mask in the method and leave "
                f"sam=True; got {', '.join(given) if given else 'sam=False'} here"
            )
    else:
        sam_method(0.0, **shape)  # checks adaptive, eta, norm and mask now
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
        if method is not None:
            raise ValueError(
                "loss_scale with method=... is not supported yet: a method's ascent and state "
                "would see the scaled gradient; use bfloat16 autocast, or the default method"
            )
    return _SamSettings(sam, rho, shape, method, engine, policy, loss_scale)


class _Gradient(NamedTuple):
    grads: PyTree
    value: Any
    finite: torch.Tensor | None  # None: read it from the gradient's norm
    method_state: Any


def _method_state(state: TrainState) -> Any:
    if state.method_state == ():
        raise ValueError(
            "this step runs a method, but state.method_state is empty: build the state "
            "with init_train_state(..., method=the same method)"
        )
    return state.method_state


def _first_pass(
    loss_fn: Callable[..., Any],
    state: TrainState,
    batch: Any,
    settings: _SamSettings,
    has_aux: bool,
) -> FirstPass:
    """The first pass of a method whose policy reads the gradient (AE-SAM), and its verdict."""
    grad = settings.method.grad if settings.method is not None else None
    assert isinstance(grad, MethodGrad)
    run = run_options({**settings.engine, "has_aux": has_aux})
    return grad.first(loss_fn, state.params, batch, _method_state(state), run)


def _passes(
    loss_fn: Callable[..., Any],
    state: TrainState,
    batch: Any,
    settings: _SamSettings,
    rho: float | torch.Tensor,
    has_aux: bool,
    kind: Kind = PLANNED,
) -> tuple[PyTree, Any, Any]:
    """The method's passes (SAM's by default), or one gradient pass with ``sam=False``.

    ``kind`` is the kind of step a method with a policy was told to take.
    Returns ``(grads, value, new method state)``.
    """
    params = state.params
    if settings.method is not None:
        grad = settings.method.grad
        method_state = _method_state(state)
        if kind.first is not None:
            assert isinstance(grad, MethodGrad) and kind.full is not None
            run = run_options({**settings.engine, "has_aux": has_aux})
            return grad.finish(loss_fn, params, batch, method_state, kind.first, run, kind.full)
        extra = {} if kind.full is None else {"full": kind.full}
        return grad(
            loss_fn, params, batch, method_state, has_aux=has_aux, **settings.engine, **extra
        )
    if settings.sam:  # the engine applies the nonfinite option itself
        # A tensor radius is already guarded (NaN if a schedule went bad); as a
        # schedule it reaches the ascent unread, so the non-finite policy decides.
        radius = (lambda _: rho) if isinstance(rho, torch.Tensor) else rho
        method = sam_method(radius, **settings.shape)
        grads, value, _ = method.grad(
            loss_fn, params, batch, method.init(params), has_aux=has_aux, **settings.engine
        )
        return grads, value, state.method_state
    if settings.nonfinite == "raise":
        refuse_raise_under_compile()
    grad_fn = grad_and_value(checked_loss_fn(loss_fn, has_aux), has_aux=has_aux)
    data_parallel = settings.engine.get("data_parallel")
    grads, value = mean_pass(Pass(*grad_fn(params, batch)), data_parallel, has_aux)
    if settings.nonfinite == "raise":
        raise_if_nonfinite(grads, "the gradient pass", value[0] if has_aux else value)
    return grads, value, state.method_state


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
    kind: Kind = PLANNED,
) -> _Gradient:
    """The step's gradient and loss (value), unscaled, and whether the gradient is finite."""
    if settings.loss_scale is None:
        grads, value, method_state = _passes(loss_fn, state, batch, settings, rho, has_aux, kind)
        return _Gradient(grads, value, None, method_state)
    scale = state.loss_scale
    if not isinstance(scale, LossScaleState):
        raise ValueError(
            "this step scales the loss, but state.loss_scale is empty: build the state with "
            "init_train_state(..., loss_scale=the same dynamic_loss_scale())"
        )
    # A normalized ascent (l2, inf) ignores the scale of g; the unnormalized one does not.
    radius = rho / scale.scale if settings.shape.get("norm", "l2") == "none" else rho
    scaled = _scaled_loss(loss_fn, scale, has_aux)
    grads, (_, (loss, aux)), method_state = _passes(scaled, state, batch, settings, radius, True)
    grads, finite = unscale_grads(grads, scale)
    loss = loss.mean() if loss.ndim else loss  # one loss per chunk or micro-batch: the mean
    data_parallel = settings.engine.get("data_parallel")
    if data_parallel is not None:  # the passes averaged the scaled loss, not this one
        loss = all_mean(loss, data_parallel.group)
    return _Gradient(grads, (loss, aux) if has_aux else loss, finite, method_state)


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
    method_state = gradient.method_state
    if settings.nonfinite == "skip":
        params = _tree.where(finite, params, state.params)
        opt_state = _tree.where(finite, opt_state, state.opt_state)
        buffers = _tree.where(finite, buffers, state.buffers)
        method_state = _kept_counters(
            _tree.where(finite, method_state, state.method_state), method_state
        )
    loss_scale = state.loss_scale
    if settings.loss_scale is not None and isinstance(loss_scale, LossScaleState):
        loss_scale = settings.loss_scale.update(loss_scale, finite)
    new_state = TrainState(params, opt_state, buffers, state.step + 1, loss_scale, method_state)
    return _Updated(new_state, grad_norm, finite)


def _kept_counters(reverted: Any, new: Any) -> Any:
    """A skipped step's method state, with its policy's step counters moved on all the same.

    The counters count attempts, as ``state.step`` does, so a policy's plan
    stays in step with the train step's count.
    """
    if not isinstance(new, MethodState) or not hasattr(new.policy, "full_steps"):
        return reverted
    policy = reverted.policy._replace(steps=new.policy.steps, full_steps=new.policy.full_steps)
    return reverted._replace(policy=policy)


def _rho_metric(settings: _SamSettings, rho_metric: torch.Tensor, new: TrainState) -> torch.Tensor:
    if settings.method is None:
        return rho_metric
    return _radius_in(new.method_state, new.step.device)


def make_train_step(
    loss_fn: Callable[[PyTree, Any], torch.Tensor],
    optimizer: GradientTransformation,
    **options: Unpack[StepOptions],
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """A pure SAM train step for ``loss_fn(params, batch) -> scalar loss``.

    Args:
        loss_fn: the loss, a function of the params and a batch.
        optimizer: the ``GradientTransformation`` that turns gradients into updates.
        **options: ``method`` (default SAM), ``sam``, ``nonfinite`` (default
            ``"skip"``), ``loss_scale``, SAM's ``rho`` (a float or a schedule of
            ``state.step``), ``adaptive``, ``eta``, ``norm``, ``mask``, and
            ``num_chunks``, ``accum_steps``, ``vectorize_chunks``: see
            ``samfunc.StepOptions``.

    Returns:
        ``step(state, batch) -> (new_state, StepMetrics)``; compile it with
        ``samfunc.compile_step(step, fullgraph=True)`` (``torch.compile`` for
        most methods). For a method with a step policy (LookSAM, AE-SAM,
        ``with_policy``) the step is a ``samfunc.ChoosingStep``: it picks the
        kind of each step in Python and runs one of two pure steps (one graph
        each once compiled).

    Examples:
        >>> import torch
        >>> import samfunc
        >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
        >>> opt = samfunc.sgd(0.1)
        >>> step = samfunc.make_train_step(loss_fn, opt, rho=0.05)
        >>> state = samfunc.init_train_state({"w": torch.ones(3)}, opt)
        >>> state, metrics = step(state, torch.randn(8, 3))
    """
    settings = _settings(options)

    def step(state: TrainState, batch: Any, kind: Kind = PLANNED) -> tuple[TrainState, StepMetrics]:
        rho_now, rho_metric = _rho_at(settings.rho, state.step)
        gradient = _gradient(loss_fn, state, batch, settings, rho_now, False, kind)
        new = _update(optimizer, settings, state, gradient, state.buffers)
        rho_metric = _rho_metric(settings, rho_metric, new.state)
        metrics = StepMetrics(gradient.value, new.grad_norm, rho_metric, finite=new.finite)
        return new.state, metrics

    def first(state: TrainState, batch: Any) -> FirstPass:
        return _first_pass(loss_fn, state, batch, settings, False)

    return _returned(step, first, settings)


def _returned(
    step: Callable[..., tuple[TrainState, StepMetrics]],
    first: Callable[[TrainState, Any], FirstPass],
    settings: _SamSettings,
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """``step`` itself, or a ``ChoosingStep`` around it for a method with a step policy."""
    grad = settings.method.grad if settings.method is not None else None
    if not chooses(grad):
        return step
    return ChoosingStep(step, first, grad)


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
    **options: Unpack[StepOptions],
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """A pure SAM train step for an ``nn.Module``, with its buffers threaded through.

    ``batch`` is ``(inputs, targets)`` and the loss is ``criterion(module(inputs),
    targets)`` (see ``module_loss``). The new buffers (BatchNorm running
    statistics) come from the first, unperturbed pass; with ``num_chunks`` or
    ``accum_steps`` they are averaged over the parts (see ``mean_over_parts``).
    BatchNorm in training mode needs ``vectorize_chunks=False`` with
    ``num_chunks > 1``. The other arguments are those of ``make_train_step``.

    Examples:
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
    refuse_parallel_wrapper(module)
    settings = _settings(options)
    parts = settings.engine.get("num_chunks", 1) * settings.engine.get("accum_steps", 1)
    parts = parts if settings.sam else 1

    def step(state: TrainState, batch: Any, kind: Kind = PLANNED) -> tuple[TrainState, StepMetrics]:
        rho_now, rho_metric = _rho_at(settings.rho, state.step)
        loss_fn = module_loss(module, criterion, state.buffers, detach_output=False)
        gradient = _gradient(loss_fn, state, batch, settings, rho_now, True, kind)
        loss, aux = gradient.value
        aux = _merge_parts(aux, parts)
        new = _update(optimizer, settings, state, gradient, aux.buffers)
        rho_metric = _rho_metric(settings, rho_metric, new.state)
        metrics = StepMetrics(loss, new.grad_norm, rho_metric, aux.output, new.finite)
        return new.state, metrics

    def first(state: TrainState, batch: Any) -> FirstPass:
        loss_fn = module_loss(module, criterion, state.buffers, detach_output=False)
        return _first_pass(loss_fn, state, batch, settings, True)

    return _returned(step, first, settings)
