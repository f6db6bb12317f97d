"""Combinators: ``chain`` transforms in sequence, apply one to ``masked`` leaves.

Examples:
    >>> import torch
    >>> import samfunc
    >>> opt = samfunc.chain(samfunc.clip_by_global_norm(1.0), samfunc.sgd(0.1))
    >>> params = [torch.zeros(2)]
    >>> updates, _ = opt.update([torch.tensor([3.0, 4.0])], opt.init(params), params)
    >>> updates
    [tensor([-0.0600, -0.0800])]
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar, Literal, NamedTuple, Optional

import torch

from . import _tree
from ._base import GradientTransformation, OptState, Params, Updates, check_state
from ._tree import Mask

__all__ = [
    "chain",
    "masked",
    "MaskedState",
    "apply_if_finite",
    "ApplyIfFiniteState",
    "takes_count",
    "update_with_count",
]


def takes_count(transform: GradientTransformation) -> bool:
    """Whether ``transform.update`` takes the keyword ``count``: the step count of one clock.

    A transform that reads a schedule (``scale_by_radius``) takes ``count=``,
    the number of updates applied, from whoever drives it, so every schedule
    of a method reads the same clock; ``chain`` and ``masked`` pass it on to
    the members that take it. Asked once, when a chain or a method is built.

    Examples:
        >>> import samfunc
        >>> takes_count(samfunc.scale_by_radius(0.1)), takes_count(samfunc.normalize())
        (True, False)
    """
    marked = getattr(getattr(transform.update, "__self__", None), "TAKES_COUNT", None)
    if isinstance(marked, bool):  # samfunc's own transforms say so (also inside torch.compile)
        return marked
    if torch.compiler.is_compiling():  # inspect cannot run in a traced function
        return False
    try:
        parameters = inspect.signature(transform.update).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "count" in parameters


def update_with_count(
    transform: GradientTransformation,
    takes: bool,
    updates: Updates,
    state: OptState,
    params: Optional[Params],
    count: Optional[torch.Tensor],
) -> tuple[Updates, OptState]:
    """``transform.update``, given ``count`` when it takes one (``takes``) and there is one."""
    if takes and count is not None:
        return transform.update(updates, state, params, count=count)  # type: ignore[call-arg]
    return transform.update(updates, state, params)


@dataclasses.dataclass(frozen=True)
class _Chain:
    TAKES_COUNT: ClassVar[bool] = True

    transforms: tuple[GradientTransformation, ...]
    takes: tuple[bool, ...]

    def init(self, params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in self.transforms)

    def update(
        self,
        updates: Updates,
        state: OptState,
        params: Optional[Params] = None,
        *,
        count: Optional[torch.Tensor] = None,
    ) -> tuple[Updates, OptState]:
        if not isinstance(state, tuple) or len(state) != len(self.transforms):
            size = len(state) if isinstance(state, tuple) else type(state).__name__
            raise ValueError(
                f"state has {size} entries but the chain has {len(self.transforms)} transforms: "
                f"was it made by another optimizer's init?"
            )
        new_states = []
        for transform, takes, inner_state in zip(self.transforms, self.takes, state):
            updates, new_inner = update_with_count(
                transform, takes, updates, inner_state, params, count
            )
            new_states.append(new_inner)
        return updates, tuple(new_states)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` one after the other; the state is a tuple of theirs.

    The chain's ``update`` takes ``count=`` (see ``takes_count``) and passes
    it to the transforms that take it.

    Examples:
        >>> import samfunc
        >>> opt = samfunc.chain(samfunc.trace(0.9), samfunc.scale_by_learning_rate(0.1))
    """
    for index, transform in enumerate(transforms):
        if not isinstance(transform, GradientTransformation):
            raise TypeError(
                f"chain takes GradientTransformations; "
                f"argument {index} is {type(transform).__name__}"
            )
    built = _Chain(tuple(transforms), tuple(takes_count(t) for t in transforms))
    return GradientTransformation(built.init, built.update)


class MaskedState(NamedTuple):
    """State of ``masked``: the inner transform's state over the selected leaves."""

    inner_state: OptState


@dataclasses.dataclass(frozen=True)
class _Masked:
    TAKES_COUNT: ClassVar[bool] = True

    inner: GradientTransformation
    mask: Mask
    others: Literal["keep", "zero"]
    takes: bool

    def init(self, params: Params) -> MaskedState:
        flags = _tree.resolve_mask(self.mask, params)
        return MaskedState(inner_state=self.inner.init(_tree.select(params, flags)))

    def update(
        self,
        updates: Updates,
        state: OptState,
        params: Optional[Params] = None,
        *,
        count: Optional[torch.Tensor] = None,
    ) -> tuple[Updates, OptState]:
        check_state("masked", state, MaskedState)
        flags = _tree.resolve_mask(self.mask, updates if params is None else params)
        kept = _zero_unselected(updates, flags) if self.others == "zero" else updates
        if not any(flags):
            return kept, state
        selected_params = None if params is None else _tree.select(params, flags)
        new_selected, new_inner = update_with_count(
            self.inner,
            self.takes,
            _tree.select(updates, flags),
            state.inner_state,
            selected_params,
            count,
        )
        return _tree.merge(kept, new_selected, flags), MaskedState(inner_state=new_inner)


def masked(
    inner: GradientTransformation, mask: Mask, *, others: Literal["keep", "zero"] = "keep"
) -> GradientTransformation:
    """Applies ``inner`` only to the leaves ``mask`` selects; the others pass through.

    This is the functional form of parameter groups: for example, weight decay
    on weights only. ``inner`` sees (and keeps state for) a flat list of the
    selected leaves.

    Args:
        inner: the transform to apply to the selected leaves.
        mask: a tree of bools with the params' structure, or a predicate
            ``(path, leaf) -> bool`` on each leaf's dotted key path
            (``"layer.0.weight"``). It must select the same leaves at every step.
            A predicate must be a module-level function or object for the
            transform to pickle (a lambda does not).
        others: what the leaves ``mask`` leaves out become: ``"keep"`` (as they
            are, as optax's ``masked``) or ``"zero"`` (zeros: an ascent that
            must not move them, as SAM's ``mask``).

    Examples:
        >>> import torch
        >>> import samfunc
        >>> no_bias = lambda path, leaf: not path.endswith("bias")
        >>> decay = samfunc.masked(samfunc.add_decayed_weights(0.1), no_bias)
        >>> params = {"weight": torch.ones(1), "bias": torch.ones(1)}
        >>> grads = {"weight": torch.zeros(1), "bias": torch.zeros(1)}
        >>> decay.update(grads, decay.init(params), params)[0]
        {'weight': tensor([0.1000]), 'bias': tensor([0.])}
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"inner must be a GradientTransformation, got {type(inner).__name__}")
    if others not in ("keep", "zero"):
        raise ValueError(f"others must be 'keep' or 'zero', got {others!r}")
    built = _Masked(inner, mask, others, takes_count(inner))
    return GradientTransformation(built.init, built.update)


def _zero_unselected(tree: Updates, flags: list[bool]) -> Updates:
    leaves, spec = _tree.flatten(tree)
    return _tree.unflatten(
        [leaf if keep else torch.zeros_like(leaf) for leaf, keep in zip(leaves, flags)], spec
    )


class ApplyIfFiniteState(NamedTuple):
    """State of ``apply_if_finite``.

    Attributes:
        last_finite: whether the last gradient was finite (a 0-d bool tensor).
        notfinite_count: non-finite gradients in a row, up to the last one.
        total_notfinite: non-finite gradients since ``init``.
        inner_state: the wrapped transform's state, unchanged by skipped steps.
    """

    last_finite: torch.Tensor
    notfinite_count: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: OptState


def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Skips updates whose gradient has a NaN or inf element, as ``optax.apply_if_finite``.

    On such a step the updates are zeros (so ``apply_updates`` leaves the params
    as they were) and ``inner``'s state does not change: the semantics of
    ``torch.amp.GradScaler``'s skipped step, compile-safe (no device sync, no
    branch on a tensor's value). The counts in the state say how often it
    happened. Wrap the optimizer of a hand-written step with it; the train
    steps skip with ``nonfinite="skip"``.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> opt = samfunc.apply_if_finite(samfunc.sgd(0.1))
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([1.0, float("nan")])}, state, params)
        >>> updates["w"], int(state.total_notfinite)
        (tensor([0., 0.]), 1)
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"inner must be a GradientTransformation, got {type(inner).__name__}")

    built = _ApplyIfFinite(inner)
    return GradientTransformation(built.init, built.update)


@dataclasses.dataclass(frozen=True)
class _ApplyIfFinite:
    inner: GradientTransformation

    def init(self, params: Params) -> ApplyIfFiniteState:
        first = _tree.leaves(params)
        device = first[0].device if first else None
        count = torch.zeros((), dtype=torch.int64, device=device)
        return ApplyIfFiniteState(
            last_finite=torch.ones((), dtype=torch.bool, device=device),
            notfinite_count=count,
            total_notfinite=count.clone(),
            inner_state=self.inner.init(params),
        )

    def update(
        self, updates: Updates, state: OptState, params: Optional[Params] = None
    ) -> tuple[Updates, OptState]:
        check_state("apply_if_finite", state, ApplyIfFiniteState)
        finite = _tree.all_finite(updates)
        new_updates, new_inner = self.inner.update(updates, state.inner_state, params)
        kept = _tree.where(finite, new_updates, _tree.zeros_like(new_updates))
        bad = (~finite).to(torch.int64)
        new_state = ApplyIfFiniteState(
            last_finite=finite,
            notfinite_count=(state.notfinite_count + bad) * bad,
            total_notfinite=state.total_notfinite + bad,
            inner_state=_tree.where(finite, new_inner, state.inner_state),
        )
        return kept, new_state
