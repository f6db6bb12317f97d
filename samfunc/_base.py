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


def check_state(owner: str, state: Any, expected: type) -> None:
    """Raises ``TypeError`` if ``state`` was not made by ``owner``'s ``init``.

    Catches a state from another optimizer (an Adam state given to SGD) before
    it is read field by field.

    Examples:
        >>> check_state("trace", EmptyState(), EmptyState)
    """
    if not isinstance(state, expected):
        raise TypeError(
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
    """

    init: TransformInitFn
    update: CombineUpdateFn
    reuse: Optional[CombineReuseFn] = None


class StepPolicy(NamedTuple):
    """When a method takes its full step (both passes) and when a cheap one (one pass at ``w``).

    The choice is made in Python, so under ``torch.compile`` the two kinds of
    step are two graphs (see ``samfunc.compile_step``), never a branch on data
    inside one.

    Attributes:
        init: ``init(params) -> state``, a NamedTuple whose first two fields are
            ``steps`` (steps taken) and ``full_steps`` (full ones among them),
            int64 0-d tensors on the CPU.
        plan: ``plan(count) -> bool | None``: whether step ``count`` (a Python
            int) is a full step, or None when the first pass's gradient decides.
        decide: for ``plan`` returning None: ``decide(g_sq_norm, state) ->
            (full, new_state)`` with ``full`` a 0-d bool tensor; it may update
            statistics in the state (AE-SAM's), but not the two counters.
        name: for error messages and reports.
    """

    init: TransformInitFn
    plan: Callable[[int], Optional[bool]]
    decide: Optional[Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]] = None
    name: str = "policy"


class MethodState(NamedTuple):
    """A method's state: its ascent's, its combiner's, and its step policy's (``()`` if none)."""

    ascent: OptState
    combine: OptState
    policy: OptState = ()


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


class Method(NamedTuple):
    """A sharpness-aware method, in the shape of ``GradientTransformation``.

    ``state = method.init(params)``, then each step
    ``grads, loss, state = method.grad(loss_fn, params, batch, state)``; with
    ``has_aux=True`` the second item is ``(loss, aux)``. ``grads`` is what the
    optimizer gets; ``loss`` is the loss at ``w``.

    Attributes:
        init: ``init(params) -> state``.
        grad: ``grad(loss_fn, params, batch, state, **EngineOptions)``.
    """

    init: MethodInitFn
    grad: MethodGradFn
