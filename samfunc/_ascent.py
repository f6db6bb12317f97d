"""Ascent transforms: from the gradient ``g`` at ``w`` to the perturbation ``e``.

An ascent is a ``GradientTransformation``: ``update(g, state, params)``
returns ``(e, new_state)``. SAM's is a ``chain`` of small pieces::

    e = rho * g / (||g||_2 + 1e-12)              chain(normalize(), scale_by_radius(rho))

and ASAM's (Kwon et al., 2021) rescales by ``T = |w| + eta`` before and after
the norm: ``e = rho * T^2 g / ||T g||``. Directions with memory are pieces
with state: Friendly-SAM's ``subtract_momentum`` and VaSSO's
``average_gradients``; ESAM's ``random_leaf_subset`` perturbs a random subset
of the leaves. Any transform that returns ``+e`` can be an ascent: pass it to
``samfunc.sharpness_aware``. Unlike ``adv_optimizer`` in ``optax.contrib.sam``,
its output is not negated, so end the chain in ``scale_by_radius(rho)``, not in
an optimizer such as ``sgd(rho)`` (which would descend).

Examples:
    >>> import torch
    >>> import samfunc
    >>> ascent = samfunc.chain(samfunc.normalize(), samfunc.scale_by_radius(0.5))
    >>> g = {"w": torch.tensor([3.0, 4.0])}
    >>> e, _ = ascent.update(g, ascent.init(g), g)
    >>> e["w"]
    tensor([0.3000, 0.4000])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Optional

import torch

from . import _tree
from ._base import (
    EmptyState,
    GradientTransformation,
    Norm,
    OptState,
    Params,
    Rho,
    Schedule,
    StateMismatchError,
    Updates,
    check_state,
)
from ._combine import MaskedState, chain, masked, update_with_count
from ._rng import uniform
from ._schedule import check_schedule_nonnegative
from ._transform import init_count
from ._tree import Mask
from ._validate import (
    check_fraction,
    check_in_interval,
    check_nonnegative,
    check_rho,
    guard_radius,
)

__all__ = [
    "NORM_EPS",
    "NORMS",
    "Norm",
    "Rho",
    "ScaleByRadiusState",
    "SamAscentState",
    "AverageGradientsState",
    "SubtractMomentumState",
    "RandomLeafSubsetState",
    "check_norm",
    "check_adaptive",
    "normalize",
    "scale_by_param_abs",
    "scale_by_radius",
    "average_gradients",
    "subtract_momentum",
    "random_leaf_subset",
    "joining_leaves",
    "sam_ascent",
    "mask_flags",
]

#: Added to the gradient norm before dividing, as in the seed (davda54/sam); the authors' JAX
#: code and ``optax.contrib.normalize`` add none (``normalize(eps=0.0)``).
NORM_EPS = 1e-12

NORMS: tuple[Norm, ...] = ("l2", "none", "inf")


def check_norm(norm: Any) -> Norm:
    """``norm`` if it is one of ``NORMS``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    result: Norm = norm
    return result


def check_adaptive(adaptive: Any) -> bool | Mask:
    """``adaptive`` is a bool or a mask; a string such as ``"False"`` is neither."""
    if isinstance(adaptive, (bool, dict, list, tuple)) or callable(adaptive):
        return adaptive
    raise TypeError(
        "adaptive must be True, False, a tree of bools or a predicate (path, leaf) -> bool, "
        f"got {adaptive!r}"
    )


def _empty_init(params: Params) -> EmptyState:
    del params
    return EmptyState()


def _needs_params(owner: str, params: Optional[Params]) -> Params:
    if params is None:
        raise ValueError(f"{owner} needs params: call update(grads, state, params)")
    return params


def _times_factor(updates: Updates, factor: float | torch.Tensor) -> Updates:
    """``factor * updates``; 16-bit leaves are multiplied in float32.

    ``rho / ||g||`` can exceed float16's range when the gradient is tiny, so
    half-precision leaves are upcast for the product and cast back.
    """
    leaves, spec = _tree.flatten(updates)
    if not leaves:
        return updates
    if all(leaf.element_size() >= 4 for leaf in leaves):
        return _tree.unflatten(_tree.mul_leaves(leaves, factor), spec)
    wide = [leaf.float() if leaf.element_size() < 4 else leaf for leaf in leaves]
    scaled = _tree.mul_leaves(wide, factor)
    return _tree.unflatten([s.to(leaf.dtype) for s, leaf in zip(scaled, leaves)], spec)


def normalize(ord: Norm = "l2", *, eps: float = NORM_EPS) -> GradientTransformation:
    """Scales the updates to unit norm, over all leaves together.

    Args:
        ord: ``"l2"``: ``u / (||u||_2 + 1e-12)``, one global L2 norm (a zero
            ``u`` stays zero); ``"inf"``: ``sign(u)``, the steepest ascent for
            an L-infinity ball; ``"none"``: ``u`` unchanged (unnormalized SAM).
        eps: added to the L2 norm before dividing (1e-12, the seed's; 0 for the
            authors' JAX code and optax).

    Examples:
        >>> import torch
        >>> t = normalize()
        >>> t.update([torch.tensor([3.0, 4.0])], t.init(None))[0]
        [tensor([0.6000, 0.8000])]
    """
    built = _Normalize(check_norm(ord), check_nonnegative("eps", eps))
    return GradientTransformation(_empty_init, built.update)


@dataclasses.dataclass(frozen=True)
class _Normalize:
    ord: Norm
    eps: float

    def update(
        self, updates: Updates, state: OptState, params: Optional[Params] = None
    ) -> tuple[Updates, OptState]:
        del params
        if self.ord == "none":
            return updates, state
        if self.ord == "inf":
            return _tree.tree_map(torch.sign, updates), state
        return _times_factor(updates, 1.0 / (_tree.global_norm(updates) + self.eps)), state


def scale_by_param_abs(eta: float = 0.0) -> GradientTransformation:
    """Multiplies the updates by ``T = |w| + eta``, leaf by leaf: ASAM's ``T_w``.

    Needs ``params`` in ``update``. Kwon et al. (2021) use it before and after
    the norm: ``chain(scale_by_param_abs(eta), normalize(), scale_by_param_abs(eta), ...)``
    gives ``T^2 g / ||T g||``.

    Examples:
        >>> import torch
        >>> t = scale_by_param_abs(0.5)
        >>> t.update([torch.ones(2)], t.init(None), [torch.tensor([-1.0, 0.0])])[0]
        [tensor([1.5000, 0.5000])]
    """
    built = _ScaleByParamAbs(check_nonnegative("eta", eta))
    return GradientTransformation(_empty_init, built.update)


@dataclasses.dataclass(frozen=True)
class _ScaleByParamAbs:
    eta: float

    def update(
        self, updates: Updates, state: OptState, params: Optional[Params] = None
    ) -> tuple[Updates, OptState]:
        weights = _tree.leaves(_needs_params("scale_by_param_abs", params))
        leaves, spec = _tree.flatten(updates)
        if _tree.fused_ops():
            scales = list(torch._foreach_add(torch._foreach_abs(weights), self.eta))
        else:
            scales = [w.abs() + self.eta for w in weights]
        return _tree.unflatten(_tree.mul_lists(leaves, scales), spec), state


class ScaleByRadiusState(NamedTuple):
    """State of ``scale_by_radius``.

    Attributes:
        step: how many updates were made (a schedule's argument).
        radius: the radius of the last update (float32; a metric to report).
    """

    step: torch.Tensor
    radius: torch.Tensor


def scale_by_radius(rho: Rho) -> GradientTransformation:
    """Multiplies the updates by the radius ``rho``.

    A schedule reads the clock: ``update(..., count=n)`` with ``n`` the
    number of updates applied, which every samfunc driver passes (so rho
    moves with the learning rate, also on steps a policy makes cheap); called
    without ``count``, it reads the number of calls in its own state.

    Args:
        rho: a float >= 0; a floating 0-d tensor; or a schedule ``step -> rho``
            of the number of updates applied (``samfunc.linear_schedule`` and
            the others; GSAM ties it to the learning rate with
            ``samfunc.rho_from_learning_rate``). A schedule's value that is
            negative or not finite becomes NaN, so the non-finite policy of the
            caller catches it instead of a silent descent.

    Examples:
        >>> import torch
        >>> t = scale_by_radius(0.1)
        >>> t.update([torch.ones(2)], t.init([torch.ones(2)]))[0]
        [tensor([0.1000, 0.1000])]
    """
    if callable(rho) and not isinstance(rho, torch.Tensor):
        built = _ScaleByRadius(None, check_schedule_nonnegative("rho", rho))
    else:
        built = _ScaleByRadius(check_rho(rho), None)
    return GradientTransformation(built.init, built.update)


@dataclasses.dataclass(frozen=True)
class _ScaleByRadius:
    TAKES_COUNT: ClassVar[bool] = True

    constant: float | torch.Tensor | None
    schedule: Schedule | None

    def init(self, params: Params) -> ScaleByRadiusState:
        step = init_count(params)
        return ScaleByRadiusState(step, torch.zeros((), dtype=torch.float32, device=step.device))

    def update(
        self,
        updates: Updates,
        state: OptState,
        params: Optional[Params] = None,
        *,
        count: Optional[torch.Tensor] = None,
    ) -> tuple[Updates, OptState]:
        del params
        radius = self.radius(state, count)
        return _times_factor(updates, radius), self.advanced(state, radius)

    def radius(self, state: OptState, count: Optional[torch.Tensor]) -> float | torch.Tensor:
        """The radius at the clock's ``count`` (or the state's own count without one)."""
        check_state("scale_by_radius", state, ScaleByRadiusState)
        if self.schedule is None:
            assert self.constant is not None
            if isinstance(self.constant, torch.Tensor):  # it may have changed in place
                return guard_radius(self.constant)
            return self.constant
        value = self.schedule(state.step if count is None else count)
        if not isinstance(value, torch.Tensor):  # a user's schedule may return a float
            value = _radius_from(value)
        return guard_radius(value)

    @staticmethod
    def advanced(state: ScaleByRadiusState, radius: float | torch.Tensor) -> ScaleByRadiusState:
        """The state after a step at ``radius`` (kept as a float32 metric).

        Recorded at every step, also for a constant rho: a state may come from
        another method's ``init`` (``init_train_state`` builds ``sam(0.05)``'s).
        """
        return ScaleByRadiusState(state.step + 1, _tree.scalar_like(state.radius, radius))


@dataclasses.dataclass(frozen=True)
class _ToRadius:
    """``normalize()`` then ``scale_by_radius(rho)`` in one product: ``g * (rho / (||g|| + eps))``.

    SAM's ascent, as the seed computes it (one factor, one multiplication);
    its state is ``scale_by_radius``'s.
    """

    TAKES_COUNT: ClassVar[bool] = True

    scale: _ScaleByRadius
    eps: float

    def init(self, params: Params) -> ScaleByRadiusState:
        return self.scale.init(params)

    def update(
        self,
        updates: Updates,
        state: OptState,
        params: Optional[Params] = None,
        *,
        count: Optional[torch.Tensor] = None,
    ) -> tuple[Updates, OptState]:
        del params
        radius = self.scale.radius(state, count)
        factor = radius / (_tree.global_norm(updates) + self.eps)
        return _times_factor(updates, factor), self.scale.advanced(state, radius)


def _to_radius(rho: Rho, eps: float = NORM_EPS) -> GradientTransformation:
    """``chain(normalize("l2", eps=eps), scale_by_radius(rho))`` as one transform."""
    scale = scale_by_radius(rho).update.__self__  # type: ignore[attr-defined]
    built = _ToRadius(scale, eps)
    return GradientTransformation(built.init, built.update)


def _radius_from(value: Any) -> torch.Tensor:
    """A schedule's value that is not a tensor, as a float64 0-d tensor (or a clear error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"a rho schedule must return a number or a 0-d tensor, got {type(value).__name__} "
            f"{value!r}"
        )
    return torch.tensor(float(value), dtype=torch.float64)


class AverageGradientsState(NamedTuple):
    """State of ``average_gradients``: the step count and the moving average ``d``."""

    step: torch.Tensor
    average: Updates


def average_gradients(theta: float) -> GradientTransformation:
    """VaSSO's direction: a moving average of the gradients (Li & Giannakis, 2023).

    ``d = g`` at the first step, then ``d = (1 - theta) d + theta g``; the
    update is ``d``. ``theta = 1`` gives ``g`` itself (plain SAM's direction).

    Examples:
        >>> import torch
        >>> t = average_gradients(0.5)
        >>> state = t.init([torch.zeros(1)])
        >>> d, state = t.update([torch.ones(1)], state)
        >>> d, _ = t.update([torch.zeros(1)], state)
        >>> d
        [tensor([0.5000])]
    """
    built = _AverageGradients(check_fraction("theta", theta))
    return GradientTransformation(built.init, built.update)


@dataclasses.dataclass(frozen=True)
class _AverageGradients:
    theta: float

    def init(self, params: Params) -> AverageGradientsState:
        return AverageGradientsState(init_count(params), _tree.zeros_like(params))

    def update(
        self, updates: Updates, state: OptState, params: Optional[Params] = None
    ) -> tuple[Updates, OptState]:
        del params
        check_state("average_gradients", state, AverageGradientsState)
        _tree.check_same_shapes(state.average, updates, "the state's average", "updates")
        moved = _lerp(state.average, updates, self.theta)
        average = _tree.where(state.step == 0, updates, moved)
        return average, AverageGradientsState(state.step + 1, average)


def _lerp(old: Updates, new: Updates, weight: float) -> Updates:
    """``(1 - weight) old + weight new``, leaf by leaf."""
    old_leaves, spec = _tree.flatten(old)
    new_leaves = _tree.leaves(new)
    if _tree.fused_ops():
        kept = torch._foreach_mul(old_leaves, 1.0 - weight)
        return _tree.unflatten(torch._foreach_add(kept, new_leaves, alpha=weight), spec)
    return _tree.unflatten(
        [o * (1.0 - weight) + n * weight for o, n in zip(old_leaves, new_leaves)], spec
    )


class SubtractMomentumState(NamedTuple):
    """State of ``subtract_momentum``: the step count and the momentum ``m``."""

    step: torch.Tensor
    momentum: Updates


def subtract_momentum(sigma: float, lmbda: float) -> GradientTransformation:
    """Friendly-SAM's direction: the gradient minus its full-batch part (Li et al., 2024).

    The update is ``g - sigma m`` with ``m`` the momentum before this step
    (``g`` itself at the first step); then ``m = lmbda m + (1 - lmbda) g``,
    an average of the raw gradients (``m = g`` at the first step).

    Examples:
        >>> import torch
        >>> t = subtract_momentum(1.0, 0.5)
        >>> state = t.init([torch.zeros(1)])
        >>> u, state = t.update([torch.ones(1)], state)
        >>> u, _ = t.update([torch.full((1,), 3.0)], state)
        >>> u
        [tensor([2.])]
    """
    sigma = check_nonnegative("sigma", sigma)
    lmbda = check_in_interval("lmbda", lmbda, 0.0, 1.0)
    built = _SubtractMomentum(sigma, lmbda)
    return GradientTransformation(built.init, built.update)


@dataclasses.dataclass(frozen=True)
class _SubtractMomentum:
    sigma: float
    lmbda: float

    def init(self, params: Params) -> SubtractMomentumState:
        return SubtractMomentumState(init_count(params), _tree.zeros_like(params))

    def update(
        self, updates: Updates, state: OptState, params: Optional[Params] = None
    ) -> tuple[Updates, OptState]:
        del params
        check_state("subtract_momentum", state, SubtractMomentumState)
        _tree.check_same_shapes(state.momentum, updates, "the state's momentum", "updates")
        first = state.step == 0
        moved = _tree.add_scaled(updates, state.momentum, -self.sigma)
        direction = _tree.where(first, updates, moved)
        momentum = _tree.where(first, updates, _lerp(state.momentum, updates, 1.0 - self.lmbda))
        return direction, SubtractMomentumState(state.step + 1, momentum)


class RandomLeafSubsetState(NamedTuple):
    """State of ``random_leaf_subset``: the generator's key and the step count."""

    key: torch.Tensor
    step: torch.Tensor


def random_leaf_subset(beta: float, seed: int = 0) -> GradientTransformation:
    """ESAM's stochastic weight perturbation: each leaf joins with probability ``beta``.

    Leaves that do not join become zeros, so a ``normalize`` after this takes
    the norm over the joining leaves only and they are not perturbed, as in
    the ESAM authors' code (Du et al., 2022), which then divides ``e`` by
    ``beta``. The draws are a pure function of ``(seed, step)`` (a
    counter-based hash, ``samfunc._rng.uniform``), so a run is reproducible,
    resumable from a saved state, and compilable.

    Examples:
        >>> import torch
        >>> t = random_leaf_subset(1.0)
        >>> t.update([torch.ones(1)], t.init([torch.ones(1)]))[0]
        [tensor([1.])]
    """
    beta = check_fraction("beta", beta)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(
            f"seed must be in [0, 2**32), got {seed}: the draws hash its low 32 bits, so a "
            f"larger seed would give the same draws as {seed & 0xFFFFFFFF}"
        )
    built = _RandomLeafSubset(beta, seed)
    return GradientTransformation(built.init, built.update)


@dataclasses.dataclass(frozen=True)
class _RandomLeafSubset:
    beta: float
    seed: int

    def init(self, params: Params) -> RandomLeafSubsetState:
        step = init_count(params)
        return RandomLeafSubsetState(torch.full_like(step, self.seed), step)

    def update(
        self, updates: Updates, state: OptState, params: Optional[Params] = None
    ) -> tuple[Updates, OptState]:
        del params
        check_state("random_leaf_subset", state, RandomLeafSubsetState)
        leaves, spec = _tree.flatten(updates)
        joins = joining_leaves(state.key, state.step, len(leaves), self.beta)
        chosen = [
            torch.where(joins[i].to(leaf.device), leaf, torch.zeros_like(leaf))
            for i, leaf in enumerate(leaves)
        ]
        return _tree.unflatten(chosen, spec), RandomLeafSubsetState(state.key, state.step + 1)


def joining_leaves(key: torch.Tensor, step: torch.Tensor, count: int, beta: float) -> torch.Tensor:
    """Which of ``count`` leaves join ``random_leaf_subset``'s ascent at ``step`` (bools)."""
    return uniform(key, step, count) < beta


def _core(
    adaptive: Sequence[bool], as_tree: Mask, eta: float, ord: Norm, rho: Rho
) -> list[GradientTransformation]:
    """SAM's (or ASAM's) pieces for leaves whose adaptive flags are ``adaptive``.

    ``as_tree`` is the same flags in the structure the pieces will see.
    """
    radius = [_to_radius(rho)] if ord == "l2" else [normalize(ord), scale_by_radius(rho)]
    if not any(adaptive):
        return radius
    rescale = scale_by_param_abs(eta)
    if not all(adaptive):
        rescale = masked(rescale, as_tree)
    # T (rho T g / ||T g||) = rho T^2 g / ||T g||: the radius's state is last but one.
    return [rescale, *radius, rescale]


def sam_ascent(
    rho: Rho = 0.05,
    *,
    adaptive: bool | Mask = False,
    eta: float = 0.0,
    norm: Norm = "l2",
    mask: Optional[Mask] = None,
    direction: Optional[GradientTransformation] = None,
) -> GradientTransformation:
    """SAM's ascent, with ASAM, a mask and a direction of one's own as options.

    ``e = rho * T^2 d / ||T d||`` where ``d`` is ``direction``'s output (``g``
    when None) and ``T = |w| + eta`` on the leaves ``adaptive`` selects (1
    elsewhere); leaves outside ``mask`` get ``e = 0`` and are left out of the
    norm (and out of ``direction``'s state). Built from ``normalize``,
    ``scale_by_param_abs``, ``scale_by_radius`` and ``masked``.

    Args:
        rho: the radius: a float, a 0-d tensor or a schedule of the step count.
        adaptive: ASAM on every leaf (True) or on the leaves a mask selects.
        eta: ASAM's offset in ``T = |w| + eta``.
        norm: ``"l2"``, ``"inf"`` (``rho T sign(d)``) or ``"none"`` (``rho T^2 d``).
        mask: which leaves to perturb: a tree of bools or a predicate
            ``(path, leaf) -> bool``.
        direction: a transform applied to ``g`` first (Friendly-SAM's, VaSSO's).

    Examples:
        >>> import torch
        >>> ascent = sam_ascent(0.5)
        >>> g = {"w": torch.tensor([3.0, 4.0])}
        >>> ascent.update(g, ascent.init(g), g)[0]["w"]
        tensor([0.3000, 0.4000])
    """
    adaptive = check_adaptive(adaptive)
    eta = check_nonnegative("eta", eta)
    norm = check_norm(norm)
    if not callable(rho) or isinstance(rho, torch.Tensor):
        check_rho(rho)
    else:
        check_schedule_nonnegative("rho", rho)
    if direction is not None and not isinstance(direction, GradientTransformation):
        raise TypeError(
            f"direction must be a GradientTransformation, got {type(direction).__name__}"
        )
    built = _SamAscent(rho, adaptive, eta, norm, mask, direction)
    return GradientTransformation(built.init, built.update)


class SamAscentState(NamedTuple):
    """State of ``sam_ascent``: the same fields whatever its options.

    Attributes:
        direction: the ``direction`` transform's state (``()`` without one).
        radius: ``scale_by_radius``'s state (the radius of the last step).
    """

    direction: OptState
    radius: ScaleByRadiusState


class _Built(NamedTuple):
    ascent: GradientTransformation  # the chain, or its one piece (plain SAM)
    template: tuple[OptState, ...]  # the chain's state, stateless pieces only
    masked: bool
    radius_at: int  # where the radius's state sits in the chain's state; -1: the whole state


@dataclasses.dataclass(frozen=True)
class _SamAscent:
    """``sam_ascent``: its chain, built for each tree structure it meets (masks resolved then)."""

    TAKES_COUNT: ClassVar[bool] = True
    rho: Rho
    adaptive: bool | Mask
    eta: float
    norm: Norm
    mask: Optional[Mask]
    direction: Optional[GradientTransformation]
    #: The chains built so far, by the params' key paths: masks resolve once per structure.
    #: Not pickled (a copy builds its own).
    built: dict[tuple[str, ...], _Built] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "built"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in {**state, "built": {}}.items():
            object.__setattr__(self, key, value)

    def _for_params(self, params: Params) -> _Built:
        """The chain for these params' leaves, built once per tree structure.

        While ``torch.compile`` traces, the chain is built afresh and the cache
        is neither read nor written: a graph that read it would be guarded on its
        contents, and the first eager call after compiling (which fills it)
        would recompile the step.
        """
        if torch.compiler.is_compiling():
            return self._build(params)
        key = tuple(_tree.key_paths(params))  # a flat dict's keys, without a walk
        found = self.built.get(key)
        if found is None:
            found = self.built[key] = self._build(params)
        return found

    def _build(self, params: Params) -> _Built:
        spec = _tree.flatten(params)[1]
        flags = mask_flags(self.mask, params)
        chosen = tuple(_tree.select(_adaptive_flags(self.adaptive, params), flags))
        # Inside masked, the pieces see the selected leaves as a flat list.
        as_tree = list(chosen) if not all(flags) else _tree.unflatten(list(chosen), spec)
        core = _core(chosen, as_tree, self.eta, self.norm, self.rho)
        direction = [self.direction] if self.direction is not None else []
        radius_at = len(direction) + len(core) - (2 if any(chosen) else 1)
        if len(core) == 1 and not direction and all(flags):  # plain SAM: no chain around it
            return _Built(core[0], (), False, -1)
        ascent = chain(*direction, *core)
        if not all(flags):
            ascent = masked(ascent, _tree.unflatten(list(flags), spec), others="zero")
        full = ascent.init(params)
        inner = full.inner_state if not all(flags) else full
        template = tuple(
            () if (i == 0 and direction) or i == radius_at else s for i, s in enumerate(inner)
        )
        return _Built(ascent, template, not all(flags), radius_at)

    def _expand(self, built: _Built, state: SamAscentState) -> OptState:
        if built.radius_at < 0:
            return state.radius
        inner = list(built.template)
        if self.direction is not None:
            inner[0] = state.direction
        inner[built.radius_at] = state.radius
        return MaskedState(tuple(inner)) if built.masked else tuple(inner)

    def _compact(self, built: _Built, full: OptState) -> SamAscentState:
        if built.radius_at < 0:
            return SamAscentState((), full)
        inner = full.inner_state if built.masked else full
        direction = inner[0] if self.direction is not None else ()
        return SamAscentState(direction, inner[built.radius_at])

    def init(self, params: Params) -> SamAscentState:
        built = self._for_params(params)
        return self._compact(built, built.ascent.init(params))

    def update(
        self,
        updates: Updates,
        state: OptState,
        params: Optional[Params] = None,
        *,
        count: Optional[torch.Tensor] = None,
    ) -> tuple[Updates, OptState]:
        params = _needs_params("sam_ascent", params)
        check_state("sam_ascent", state, SamAscentState)
        if (self.direction is None) != (type(state.direction) is tuple and not state.direction):
            found, here = ("with", "none") if self.direction is None else ("without", "one")
            raise StateMismatchError(
                f"sam_ascent got the state of an ascent {found} a direction (its direction "
                f"part is {type(state.direction).__name__}), where this one has {here}"
            )
        built = self._for_params(params)
        if built.radius_at < 0:  # plain SAM: rho reaches _ToRadius's product directly
            e, radius = built.ascent.update(updates, state.radius, params, count=count)  # type: ignore[call-arg]
            return e, SamAscentState((), radius)
        full = self._expand(built, state)
        e, new_full = update_with_count(built.ascent, True, updates, full, params, count)
        return e, self._compact(built, new_full)


def mask_flags(mask: Optional[Mask], params: Params) -> tuple[bool, ...]:
    """One bool per leaf: all True for ``None``, else the resolved mask."""
    if mask is None:
        return (True,) * len(_tree.leaves(params))
    flags = _tree.resolve_mask(mask, params, "mask")
    if not any(flags):
        raise ValueError("mask selects no leaf of params, so nothing would be perturbed")
    return tuple(flags)


def _adaptive_flags(adaptive: bool | Mask, params: Params) -> list[bool]:
    if isinstance(adaptive, bool):
        return [adaptive] * len(_tree.leaves(params))
    return _tree.resolve_mask(adaptive, params, "adaptive")
