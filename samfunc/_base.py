"""Core types: ``GradientTransformation`` and the protocols of its two functions.

A gradient transformation is a pair of pure functions, in the style of optax:

* ``init(params) -> state`` builds the initial state;
* ``update(updates, state, params=None) -> (updates, new_state)`` transforms a
  tree of updates (at first, gradients) and returns the next state.

Every state is a NamedTuple of tensors (or a tuple of such), so it can be
saved with ``torch.save`` and passed through ``torch.compile``.

Examples:
    >>> import torch
    >>> import samfunc
    >>> opt = samfunc.sgd(0.1)
    >>> params = {"w": torch.ones(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.ones(2)}, state, params)
    >>> samfunc.apply_updates(params, updates)["w"]
    tensor([0.9000, 0.9000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Optional, Protocol, Union

import torch
from typing_extensions import TypedDict, Unpack

from ._distributed import DataParallel
from ._tree import Mask, PyTree

__all__ = [
    "PyTree",
    "Params",
    "Updates",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "TransformInitFn",
    "TransformUpdateFn",
    "GradientTransformation",
    "EmptyState",
    "check_state",
    "LossFn",
    "Norm",
    "Rho",
    "PerturbationOptions",
    "SamOptions",
    "SAM_OPTION_NAMES",
    "PARTS_OPTION_NAMES",
    "PartsOptions",
    "PassOptions",
    "EngineOptions",
    "Combiner",
    "CombineUpdateFn",
    "CombineReuseFn",
    "StepPolicy",
    "MethodState",
    "MethodInitFn",
    "MethodGradFn",
    "PointFn",
    "ObjectiveFn",
    "Pieces",
    "Method",
]

Params = PyTree
Updates = PyTree
OptState = Any

#: A schedule maps the step count (an integer 0-d tensor) to a 0-d tensor.
Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = Union[float, Schedule]


class TransformInitFn(Protocol):
    """Builds the initial state of a transformation from the parameters."""

    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    """Transforms updates; returns ``(new_updates, new_state)``, mutating nothing."""

    def __call__(
        self, updates: Updates, state: OptState, params: Optional[Params] = None
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimizer building block: ``init`` and ``update``.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(updates, state, params=None) -> (updates, new_state)``.
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


class StateMismatchError(TypeError):
    """A state made by another transform's, piece's or method's ``init`` (a ``TypeError``).

    Every driver checks a method's state part by part (ascent, combine,
    policy) and names the method whose step was given another's state.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> params = {"w": torch.ones(2)}
        >>> try:
        ...     samfunc.vasso(0.1).grad(
        ...         lambda p, b: p["w"].sum(), params, None, samfunc.sam(0.1).init(params)
        ...     )
        ... except samfunc.StateMismatchError as error:
        ...     print(str(error)[:54])
        vasso got a method state made by another method's init
    """


def check_state(owner: str, state: Any, expected: type) -> None:
    """Raises ``TypeError`` if ``state`` was not made by ``owner``'s ``init``.

    Catches a state from another optimizer (an Adam state given to SGD) before
    it is read field by field.

    Examples:
        >>> check_state("trace", EmptyState(), EmptyState)
    """
    if not isinstance(state, expected):
        raise StateMismatchError(
            f"{owner} got a state of type {type(state).__name__}, expected {expected.__name__}: "
            f"was it made by another optimizer's init? Build the state with this optimizer's "
            f"init(params)"
        )


LossFn = Callable[..., Any]


#: How the perturbation is normalized: L2 (SAM), L-infinity (sign) or not at all.
Norm = Literal["l2", "none", "inf"]

#: A radius: a float >= 0, a 0-d tensor, or a schedule of the step count.
Rho = Union[float, torch.Tensor, Schedule]


class PerturbationOptions(TypedDict, total=False):
    """How the perturbation ``e`` is shaped; every built-in method takes these.

    Their defaults and checks live in one place, ``samfunc.sam_ascent``.

    Attributes:
        adaptive: ASAM: ``True`` rescales every leaf by ``T = |w| + eta``
            (``e = rho T^2 g / ||T g||``); a mask (tree of bools or predicate
            ``(path, leaf) -> bool``) rescales the leaves it selects. Default False.
        eta: ASAM's offset in ``T = |w| + eta``. Default 0.
        norm: ``"l2"`` (default), ``"inf"`` (``rho T sign(g)``) or ``"none"``
            (``rho T^2 g``, unnormalized).
        mask: which leaves to perturb (the others get ``e = 0`` and stay out of
            the norm); e.g. ``samfunc.normalization_mask(model)`` for SAM-ON.
    """

    adaptive: Union[bool, Mask]
    eta: float
    norm: Norm
    mask: Optional[Mask]


class SamOptions(PerturbationOptions, total=False):
    """``PerturbationOptions`` and the radius ``rho`` (default 0.05)."""

    rho: Rho


#: The names ``SamOptions`` holds: what shapes SAM's ascent; the rest goes to the engine.
SAM_OPTION_NAMES = frozenset(SamOptions.__annotations__)


class PartsOptions(TypedDict, total=False):
    """How the batch is cut into parts; every method takes these.

    Attributes:
        num_chunks: m-sharpness: this many equal chunks of the batch, each with
            its own ascent, run with ``torch.func.vmap``; the gradients are
            averaged and ``aux`` leaves get a leading axis of this size. Default 1.
        accum_steps: accumulate both passes' gradients over this many
            micro-batches (one micro-batch's activations alive at a time), so the
            result equals the whole batch's; ``aux`` leaves get a leading axis of
            this size. Default 1.
        vectorize_chunks: run the chunks with ``vmap`` (default) or in a Python
            loop, for losses ``vmap`` cannot batch (BatchNorm in training mode).
        data_parallel: ``samfunc.data_parallel(mode, group)``: each process of
            a ``torch.distributed`` group holds one shard of the batch, and the
            gradients are averaged across them; ``"local"`` (each process
            perturbs with its own gradient) or ``"global"`` (with the averaged
            one: single-process SAM on the whole batch). Default None.
    """

    num_chunks: int
    accum_steps: int
    vectorize_chunks: bool
    data_parallel: Optional[DataParallel]


#: The names ``PartsOptions`` holds.
PARTS_OPTION_NAMES = frozenset(PartsOptions.__annotations__)


class PassOptions(PartsOptions, total=False):
    """``PartsOptions`` and how the passes run.

    Attributes:
        reuse_rng: the second pass replays the first pass's random draws
            (dropout masks); not under ``torch.compile(fullgraph=True)``.
            Thread-safe among samfunc calls. Default False.
        nonfinite: ``"propagate"`` (default) returns a NaN or inf gradient as it
            is; ``"raise"`` raises ``NonFiniteGradientError`` naming the pass
            and the first non-finite leaf (eager only: it reads a flag).
    """

    reuse_rng: bool
    nonfinite: Literal["propagate", "raise"]


class EngineOptions(PassOptions, total=False):
    """Everything ``method.grad`` takes after its four arguments.

    Attributes:
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the loss returned is then
            ``(loss, aux)`` from the first pass. Default False.
    """

    has_aux: bool


class CombineUpdateFn(Protocol):
    """``(g, g_s, state, params) -> (gradient, new_state)``."""

    def __call__(
        self, grads: Updates, perturbed_grads: Updates, state: OptState, params: Params
    ) -> tuple[Updates, OptState]: ...


class CombineReuseFn(Protocol):
    """``(g, state, params) -> (gradient, new_state)``: a cheap step's gradient from ``g``."""

    def __call__(
        self, grads: Updates, state: OptState, params: Params
    ) -> tuple[Updates, OptState]: ...


class Combiner(NamedTuple):
    """How a method turns the gradients at ``w`` and at ``w + e`` into its gradient.

    Plain SAM returns ``g_s``; GSAM and WSAM mix in ``g``.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(g, g_s, state, params) -> (gradient, new_state)``.
        reuse: on a cheap step (one pass, at ``w``; see ``StepPolicy``),
            ``reuse(g, state, params) -> (gradient, new_state)``; LookSAM adds
            what its last full step stored. None: the gradient is ``g``.
        reads_first_gradient: whether ``update`` reads ``g`` (False for
            plain SAM's, which returns ``g_s``): ``samfunc.SAM``'s two-step
            API keeps a copy of ``g`` only for a combiner that reads it.
        state_type: the type ``init`` returns, when known: every driver then
            checks the method state's ``combine`` part against it, so a state
            made by another method's ``init`` fails with a clear error.
    """

    init: TransformInitFn
    update: CombineUpdateFn
    reuse: Optional[CombineReuseFn] = None
    reads_first_gradient: bool = True
    state_type: Optional[type] = None


class StepPolicy(NamedTuple):
    """When a method takes its full step (both passes) and when a cheap one (one pass at ``w``).

    The choice is made in Python, so under ``torch.compile`` the two kinds of
    step are two graphs (see ``samfunc.compile_step``), never a branch on data
    inside one.

    Attributes:
        init: ``init(params) -> state``: what the policy keeps besides the
            clock (AE-SAM's statistics; ``()`` for a fixed schedule).
        plan: ``plan(count) -> bool | None``: whether the step after ``count``
            updates (a Python int: ``MethodState.steps``, the one clock) is
            full, or None when the first pass's gradient decides.
        decide: for ``plan`` returning None: ``decide(g_sq_norm, state, count)
            -> (full, new_state)`` with ``full`` a 0-d bool tensor.
        name: for error messages and reports.
    """

    init: TransformInitFn
    plan: Callable[[int], Optional[bool]]
    decide: Optional[Callable[[torch.Tensor, Any, torch.Tensor], tuple[torch.Tensor, Any]]] = None
    name: str = "policy"


class MethodState(NamedTuple):
    """The state of a method built from pieces; ``method.init(params)`` makes it.

    Attributes:
        ascent: the ascent transform's state (``()`` for a one-pass method).
        combine: the combiner's state (LookSAM's ``g_v``, Momentum-SAM's
            velocity, MESA's teacher; ``EmptyState()`` if it keeps none).
        policy: the step policy's state (``()`` without a policy).
        steps: the one clock: the number of updates applied (int64, CPU).
            Every schedule of the method (rho, a policy's) reads it; a step
            that a driver skips (non-finite gradient) does not advance it, and
            a cheap step advances it as a full one does.
        full_steps: how many of those updates took the full step (int64, CPU).
    """

    ascent: OptState
    combine: OptState
    policy: OptState
    steps: torch.Tensor
    full_steps: torch.Tensor


class MethodInitFn(Protocol):
    """Builds a method's initial state from the parameters."""

    def __call__(self, params: Params) -> OptState: ...


class MethodGradFn(Protocol):
    """``(loss_fn, params, batch, state, **options) -> (grads, loss, new_state)``."""

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: OptState,
        **options: Unpack[EngineOptions],
    ) -> tuple[Updates, Any, OptState]: ...


class PointFn(Protocol):
    """Where a one-pass method takes its gradient: ``(params, combine_state) -> point``."""

    def __call__(self, params: Params, state: OptState) -> Params: ...


class ObjectiveFn(Protocol):
    """A method that changes the loss (MESA): ``(loss_fn, params, state) -> (loss_fn, state)``.

    ``state`` is the whole ``MethodState`` (the clock included); the new
    combiner state is returned with the new loss, which returns
    ``(objective, (loss, aux))``: the gradient is the objective's, the loss
    reported is ``loss``.
    """

    def __call__(
        self, loss_fn: LossFn, params: Params, state: MethodState
    ) -> tuple[LossFn, OptState]: ...


class Pieces(NamedTuple):
    """A sharpness-aware method as data: the pieces one interpreter runs.

    Every built-in method is one such record; ``samfunc.sharpness_aware``
    builds one from your own pieces. The interpreter (``method.grad``, both
    train steps and ``samfunc.SAM`` call it) runs, per step: the first pass at
    ``w`` (or at ``point(w)``), the ``ascent`` to ``e``, the second pass at
    ``w + e`` (on ``select_fraction`` of the samples), the ``combiner``; or,
    on a step the ``policy`` makes cheap, one pass and ``combiner.reuse``.

    Attributes:
        name: for error messages.
        ascent: ``g -> e``; None for a method of one pass per step.
        combiner: ``(g, g_s) -> gradient`` on full steps, ``reuse`` on cheap
            and one-pass steps.
        policy: which steps are full; None: all (a one-pass method: none).
        select_fraction: ESAM's data selection for the second pass.
        point: a one-pass method's evaluation point (Momentum-SAM's).
        objective: a change of the loss (MESA's).
        whole: a ``Method`` whose own ``grad`` makes the full step (a bare
            user-written method given a policy).
        ascent_takes_count: whether ``ascent.update`` takes ``count=`` (the
            clock), found once when the record is built.
    """

    name: str
    ascent: Optional[GradientTransformation]
    combiner: Combiner
    policy: Optional[StepPolicy] = None
    select_fraction: Optional[float] = None
    point: Optional[PointFn] = None
    objective: Optional[ObjectiveFn] = None
    whole: Optional[Method] = None
    ascent_takes_count: bool = False


class Method(NamedTuple):
    """A sharpness-aware method, in the shape of ``GradientTransformation``.

    ``state = method.init(params)``, then each step
    ``grads, loss, state = method.grad(loss_fn, params, batch, state)``; with
    ``has_aux=True`` the second item is ``(loss, aux)``. ``grads`` is what the
    optimizer gets; ``loss`` is the loss at ``w``.

    A method of your own can be a bare ``Method(init, grad)``: ``init`` may
    return any state (``()`` included) and ``grad`` needs to take only
    ``(loss_fn, params, batch, state)`` (and ``has_aux=`` to run in
    ``make_module_train_step``); every driver runs it. The built-in methods
    also carry their ``pieces``, which the drivers interpret phase by phase.

    Attributes:
        init: ``init(params) -> state``.
        grad: ``grad(loss_fn, params, batch, state, **EngineOptions)``.
        pieces: the method as data (None for a bare method).
    """

    init: MethodInitFn
    grad: MethodGradFn
    pieces: Optional[Pieces] = None
