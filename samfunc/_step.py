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
from typing_extensions import Unpack

from . import _tree
from ._ascent import ScaleByRadiusState
from ._base import (
    PARTS_OPTION_NAMES,
    SAM_OPTION_NAMES,
    GradientTransformation,
    Method,
    OptState,
    PartsOptions,
    Pieces,
    SamOptions,
)
from ._choose import PLANNED, ChoosingStep, Kind
from ._distributed import refuse_parallel_wrapper
from ._engine import finish_phase, first_phase, interpret
from ._finite import NonFinitePolicy, check_policy
from ._interpreted import plain_gradient_method, sam_method
from ._loss_scale import DynamicLossScale, LossScaleState
from ._module import ModuleAux, has_tied_tensors, mean_over_parts, module_loss, module_state
from ._options import RunOptions, run_options
from ._passes import FirstPass
from ._phases import init_state, is_whole, pieces_of
from ._transform import ScaleByLearningRateState, init_count
from ._tree import PyTree
from ._update import apply_updates
from ._validate import check_bool

__all__ = [
    "TrainState",
    "StepMetrics",
    "StepOptions",
    "init_train_state",
    "make_train_step",
    "make_module_train_step",
]


class StepOptions(SamOptions, PartsOptions, total=False):
    """The options both train-step builders take.

    Attributes:
        method: the sharpness-aware method (``samfunc.gsam(...)``, a bare
            ``samfunc.Method(init, grad)``, ...); default ``samfunc.sam(0.05)``.
            Its state rides in ``state.method_state``: build the state with
            ``init_train_state(..., method=method)``. ``metrics.rho`` is the
            radius its ``scale_by_radius`` applied (NaN if it has none).
        rho, adaptive, eta, norm, mask: a shortcut for
            ``method=samfunc.sam(rho, adaptive=..., ...)``, which they build
            (not with ``method``); ``init_train_state``'s default state fits
            ``sam`` with any ``rho`` (a float or a schedule) and ``norm``.
        sam: False for the plain-gradient baseline (one pass, same pipeline);
            the shortcuts above are still checked, and unused.
        reuse_rng: the second pass replays the first pass's random draws
            (dropout masks), per micro-batch; eager only.
        nonfinite: a gradient with a NaN or inf element (in either pass, or
            from a rho schedule that went negative or NaN): ``"skip"`` (default)
            returns the state unchanged (``state.step`` and the method's clock
            included) and ``metrics.finite`` False, as ``torch.amp.GradScaler``
            skips a step; ``"raise"`` raises ``NonFiniteGradientError`` naming
            the pass (eager only); ``"propagate"`` applies it.
        loss_scale: dynamic loss scaling for float16 training, the functional
            ``torch.amp.GradScaler``: ``samfunc.dynamic_loss_scale()``. Both
            passes run on the loss times the scale (from ``state.loss_scale``;
            build the state with ``init_train_state(..., loss_scale=...)``),
            the gradient is unscaled once, and a step with an inf or NaN is
            skipped while the scale backs off. Each pass's gradient is
            unscaled before the method sees it, so any method works. Needs
            ``nonfinite="skip"``.
    """

    method: Optional[Method]
    sam: bool
    reuse_rng: bool
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
        step: the number of updates applied (a skipped step is not one), an
            int64 0-d tensor.
        loss_scale: the dynamic loss scale's state when the step scales the
            loss (``init_train_state(..., loss_scale=...)``), else ``()``: an
            empty tuple has no leaves, so ``tree_map`` over a state only meets
            tensors.
        method_state: the method's state (``init_train_state(..., method=...)``;
            ``samfunc.sam()``'s by default). Its ``count`` is the clock every
            schedule of the method reads.
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
        rho: the radius used in this step (NaN for a method without one, or
            on a step that took one pass).
        output: the module's detached output for this batch
            (``make_module_train_step`` only; ``None`` otherwise).
        finite: a 0-d bool tensor, False when the gradient had a NaN or inf
            element (read from ``grad_norm``, so also when that float32 norm
            overflows: elements beyond ~1e19; with ``loss_scale``, element by
            element, as ``torch.amp.GradScaler``). With ``nonfinite="skip"`` the
            step was then skipped: the state came back unchanged.
        learning_rate: the learning rate of the last update applied (this
            step's, unless it was skipped), from the optimizer's
            ``scale_by_learning_rate`` (samfunc's ``sgd``, ``adam``, ``adamw``);
            NaN for an optimizer without one.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    rho: torch.Tensor
    output: Any = None
    finite: Any = None
    learning_rate: Any = None


def init_train_state(
    params_or_module: PyTree | torch.nn.Module,
    optimizer: GradientTransformation,
    buffers: PyTree | None = None,
    *,
    loss_scale: DynamicLossScale | None = None,
    method: Optional[Method] = None,
) -> TrainState:
    """Builds the first ``TrainState`` from params (or a module) and an optimizer.

    Pass the step's ``method`` (default: ``samfunc.sam()``, whose state also
    fits a step built with ``rho=`` or ``norm=``) and its ``loss_scale``
    (``samfunc.dynamic_loss_scale()``) when the step scales the loss, so the
    state carries their states from the start.

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
    pieces = pieces_of(sam_method() if method is None else method)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        buffers={} if buffers is None else buffers,
        step=step,
        loss_scale=() if loss_scale is None else loss_scale.init(step.device),
        method_state=init_state(pieces, params),
    )


def _radius_in(method_state: Any, device: torch.device) -> torch.Tensor:
    """The radius the method's first ``scale_by_radius`` recorded, else NaN."""
    return _recorded(method_state, ScaleByRadiusState, "radius", device)


def _learning_rate_in(opt_state: Any, device: torch.device) -> torch.Tensor:
    """The learning rate the optimizer's ``scale_by_learning_rate`` recorded, else NaN."""
    return _recorded(opt_state, ScaleByLearningRateState, "learning_rate", device)


def _recorded(state: Any, kind: type, field: str, device: torch.device) -> torch.Tensor:
    """``field`` of the first ``kind`` in ``state``, depth first, else NaN (a metric).

    States nest transforms' states in tuples and lists (``chain``, ``masked``,
    ``MethodState``): only those are searched, never the dicts of tensors the
    states hold, so the search costs no walk over the parameters.
    """
    pending = [state]
    while pending:
        node = pending.pop()
        if isinstance(node, kind):
            found: torch.Tensor = getattr(node, field)
            return found
        if isinstance(node, (tuple, list)):
            pending.extend(reversed(node))
    return torch.full((), float("nan"), dtype=torch.float32, device=device)


class _Settings(NamedTuple):
    pieces: Pieces
    run: RunOptions  # has_aux filled in by each builder
    nonfinite: NonFinitePolicy
    loss_scale: DynamicLossScale | None


def _method(options: StepOptions) -> Method:
    """The one method the step runs: ``method=``, or the one the shortcuts build."""
    given = sorted(k for k in options if k in SAM_OPTION_NAMES)
    sam_on = check_bool("sam", options.get("sam", True))
    method = options.get("method")
    if method is not None:
        if given or not sam_on:
            raise ValueError(
                "with method=..., set rho, adaptive, eta, norm and mask in the method (e.g. "
                "method=samfunc.sam(rho=0.1, adaptive=True)) and leave sam=True; got "
                f"{', '.join(given) if given else 'sam=False'} here"
            )
        pieces_of(method)  # a clear error for anything but a Method
        return method
    shape: dict[str, Any] = {k: options[k] for k in given}  # type: ignore[literal-required]
    built = sam_method(**shape)  # the shortcuts are checked even when sam=False leaves them unused
    return built if sam_on else plain_gradient_method()


def _settings(options: StepOptions) -> _Settings:
    """Checks every option once, when the step is built, never inside it."""
    known = (
        SAM_OPTION_NAMES
        | PARTS_OPTION_NAMES
        | {
            "method",
            "sam",
            "reuse_rng",
            "nonfinite",
            "loss_scale",
        }
    )
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unexpected option {unknown[0]!r}; the step's options are {sorted(known)}")
    method = _method(options)
    policy = check_policy("nonfinite", options.get("nonfinite", "skip"), STEP_POLICIES)
    engine: dict[str, Any] = {k: v for k, v in options.items() if k in PARTS_OPTION_NAMES}
    engine["nonfinite"] = "raise" if policy == "raise" else "propagate"
    engine["reuse_rng"] = options.get("reuse_rng", False)
    run = run_options(engine)  # type: ignore[arg-type]  # bad values fail here
    loss_scale = options.get("loss_scale")
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
    return _Settings(pieces_of(method), run, policy, loss_scale)


class _Gradient(NamedTuple):
    grads: PyTree
    value: Any
    finite: torch.Tensor | None  # None: read it from the gradient's norm
    method_state: Any


def _method_state(state: TrainState, pieces: Pieces) -> Any:
    if state.method_state == () and not is_whole(pieces):
        raise ValueError(
            f"this step runs {pieces.name}, but state.method_state is empty: build the state "
            "with init_train_state(..., method=the same method)"
        )
    return state.method_state


def _passes(
    loss_fn: Callable[..., Any],
    state: TrainState,
    batch: Any,
    settings: _Settings,
    run: RunOptions,
    kind: Kind,
    unscale: Optional[LossScaleState] = None,
) -> tuple[PyTree, Any, Any]:
    """The method's step through the interpreter: ``(grads, value, new method state)``."""
    pieces, params = settings.pieces, state.params
    method_state = _method_state(state, pieces)
    if kind.first is not None:
        assert kind.full is not None
        first, full = kind.first, kind.full
        return finish_phase(pieces, loss_fn, params, batch, method_state, first, run, full, unscale)
    return interpret(pieces, loss_fn, params, batch, method_state, run, kind.full, unscale)


def _gradient(
    loss_fn: Callable[..., Any],
    state: TrainState,
    batch: Any,
    settings: _Settings,
    has_aux: bool,
    kind: Kind = PLANNED,
) -> _Gradient:
    """The step's gradient and loss (value), unscaled, and whether the gradient is finite."""
    run = settings.run._replace(has_aux=has_aux)
    scale = _scale_of(state, settings)
    # With a loss scale, the passes scale the loss and unscale each gradient: the method
    # sees true gradients, and finiteness is read element by element, as GradScaler does.
    grads, value, method_state = _passes(loss_fn, state, batch, settings, run, kind, scale)
    finite = None if scale is None else _tree.all_finite(grads)
    return _Gradient(grads, value, finite, method_state)


def _scale_of(state: TrainState, settings: _Settings) -> Optional[LossScaleState]:
    """The loss scale this step runs with (None without ``loss_scale``)."""
    if settings.loss_scale is None:
        return None
    scale = state.loss_scale
    if not isinstance(scale, LossScaleState):
        raise ValueError(
            "this step scales the loss, but state.loss_scale is empty: build the state with "
            "init_train_state(..., loss_scale=the same dynamic_loss_scale())"
        )
    return scale


def _first(
    loss_fn: Callable[..., Any], state: TrainState, batch: Any, settings: _Settings, has_aux: bool
) -> FirstPass:
    """The first pass of a step whose policy reads the gradient (AE-SAM), and its verdict."""
    run = settings.run._replace(has_aux=has_aux)
    method_state = _method_state(state, settings.pieces)
    scale = _scale_of(state, settings)
    return first_phase(settings.pieces, loss_fn, state.params, batch, method_state, run, scale)


class _Updated(NamedTuple):
    state: TrainState
    grad_norm: torch.Tensor
    finite: torch.Tensor


def _update(
    optimizer: GradientTransformation,
    settings: _Settings,
    state: TrainState,
    gradient: _Gradient,
    buffers: PyTree,
) -> _Updated:
    """The optimizer's update; with ``"skip"``, the old state where the gradient is not finite.

    A skipped step is no update: ``step`` and the method's clock stay where
    they were, so no schedule moves on.
    """
    grads = gradient.grads
    grad_norm = _tree.global_norm(grads)
    # The norm is reported anyway; it is finite exactly when every element is, unless
    # the float32 norm itself overflows (elements beyond ~1e19), a step no one can use.
    finite = torch.isfinite(grad_norm) if gradient.finite is None else gradient.finite
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_updates(state.params, updates)
    method_state = gradient.method_state
    step = state.step + 1
    if settings.nonfinite == "skip" and finite.device.type == "cpu" and _tree.fused_ops():
        # Eager on the CPU the flag costs nothing to read: read it once, keep whole states.
        if not bool(finite):
            params, opt_state, buffers = state.params, state.opt_state, state.buffers
            method_state, step = state.method_state, state.step
    elif settings.nonfinite == "skip":
        params = _tree.where(finite, params, state.params)
        opt_state = _tree.where(finite, opt_state, state.opt_state)
        buffers = _tree.where(finite, buffers, state.buffers)
        method_state = _kept(finite, method_state, state.method_state)
        step = state.step + finite.to(state.step.device, torch.int64)
    loss_scale = state.loss_scale
    if settings.loss_scale is not None and isinstance(loss_scale, LossScaleState):
        loss_scale = settings.loss_scale.update(loss_scale, finite)
    new_state = TrainState(params, opt_state, buffers, step, loss_scale, method_state)
    return _Updated(new_state, grad_norm, finite)


def _kept(finite: torch.Tensor, new: Any, old: Any) -> Any:
    """The method state after a step: the new one if it was applied, else the old one.

    Leaves on another device than ``finite`` (the clock, on the CPU) follow
    it through a copy, never a read on the host.
    """
    new_leaves, spec = _tree.flatten(new)
    old_leaves = _tree.leaves(old)
    if len(new_leaves) != len(old_leaves):
        raise ValueError(
            "the method returned a state of another structure than it was given: "
            f"{len(old_leaves)} leaves in, {len(new_leaves)} out"
        )
    kept = [
        torch.where(finite.to(n.device), n, o) if isinstance(n, torch.Tensor) and n is not o else n
        for n, o in zip(new_leaves, old_leaves)
    ]
    return _tree.unflatten(kept, spec)


def _returned(
    step: Callable[..., tuple[TrainState, StepMetrics]],
    first: Callable[[TrainState, Any], FirstPass],
    settings: _Settings,
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """``step`` itself, or a ``ChoosingStep`` around it for a method with a step policy."""
    if settings.pieces.policy is None:
        return step
    return ChoosingStep(step, first, settings.pieces)


def make_train_step(
    loss_fn: Callable[[PyTree, Any], torch.Tensor],
    optimizer: GradientTransformation,
    **options: Unpack[StepOptions],
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """A pure train step for ``loss_fn(params, batch) -> scalar loss``, SAM by default.

    Args:
        loss_fn: the loss, a function of the params and a batch.
        optimizer: the ``GradientTransformation`` that turns gradients into updates.
        **options: ``method`` (default ``samfunc.sam(0.05)``), or the shortcuts
            ``rho`` (a float or a schedule of the method's clock), ``adaptive``,
            ``eta``, ``norm``, ``mask`` that build ``samfunc.sam(...)``;
            ``sam``, ``reuse_rng``, ``nonfinite`` (default ``"skip"``),
            ``loss_scale``, and ``num_chunks``, ``accum_steps``,
            ``vectorize_chunks``, ``data_parallel``: see ``samfunc.StepOptions``.

    Returns:
        ``step(state, batch) -> (new_state, StepMetrics)``; compile it with
        ``samfunc.compile_step(step, fullgraph=True)`` (``torch.compile`` for
        a method without a step policy). For a method with a step policy
        (LookSAM, AE-SAM, ``with_policy``) the step is a ``samfunc.ChoosingStep``:
        it picks the kind of each step in Python and runs one of two pure steps
        (one graph each once compiled).

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
        gradient = _gradient(loss_fn, state, batch, settings, False, kind)
        new = _update(optimizer, settings, state, gradient, state.buffers)
        rho = _radius_in(gradient.method_state, new.state.step.device)
        lr = _learning_rate_in(new.state.opt_state, new.state.step.device)
        metrics = StepMetrics(gradient.value, new.grad_norm, rho, None, new.finite, lr)
        return new.state, metrics

    def first(state: TrainState, batch: Any) -> FirstPass:
        return _first(loss_fn, state, batch, settings, False)

    return _returned(step, first, settings)


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
    """A pure train step for an ``nn.Module``, with its buffers threaded through; SAM by default.

    ``batch`` is ``(inputs, targets)`` and the loss is ``criterion(module(inputs),
    targets)`` (see ``module_loss``). The new buffers (BatchNorm running
    statistics) come from the first, unperturbed pass; with ``num_chunks`` or
    ``accum_steps`` they are averaged over the parts (see ``mean_over_parts``).
    BatchNorm in training mode needs ``vectorize_chunks=False`` with
    ``num_chunks > 1``. The other arguments are those of ``make_train_step``;
    a bare ``Method(init, grad)`` must take ``has_aux`` (the loss returns
    ``(loss, ModuleAux)``). Whether the module ties weights (one tensor under
    two names) is read once, here: tie them before building the step.

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
    # module_loss runs on copies of the buffers: the second pass cannot touch the module's.
    settings = settings._replace(run=settings.run._replace(guard_running_stats=False))
    parts = settings.run.num_chunks * settings.run.accum_steps
    tied = has_tied_tensors(module)  # found once: tie weights after this, build a new step

    def step(state: TrainState, batch: Any, kind: Kind = PLANNED) -> tuple[TrainState, StepMetrics]:
        loss_fn = module_loss(
            module, criterion, state.buffers, detach_output=False, tie_weights=tied
        )
        gradient = _gradient(loss_fn, state, batch, settings, True, kind)
        loss, aux = gradient.value
        aux = _merge_parts(aux, parts)
        new = _update(optimizer, settings, state, gradient, aux.buffers)
        rho = _radius_in(gradient.method_state, new.state.step.device)
        lr = _learning_rate_in(new.state.opt_state, new.state.step.device)
        metrics = StepMetrics(loss, new.grad_norm, rho, aux.output, new.finite, lr)
        return new.state, metrics

    def first(state: TrainState, batch: Any) -> FirstPass:
        loss_fn = module_loss(
            module, criterion, state.buffers, detach_output=False, tie_weights=tied
        )
        return _first(loss_fn, state, batch, settings, True)

    return _returned(step, first, settings)
