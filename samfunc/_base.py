"""Core types: ``GradientTransformation`` and the protocols of its two functions.

A gradient transformation is a pair of pure functions, in the style of optax:

* ``init(params) -> state`` builds the initial state;
* ``update(updates, state, params=None) -> (updates, new_state)`` transforms a
  tree of updates (at first, gradients) and returns the next state.

Every state is a NamedTuple of tensors (or a tuple of such), so it can be
saved with ``torch.save`` and passed through ``torch.compile``.

Example:
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
from typing import Any, NamedTuple, Optional, Protocol, Union

import torch

from ._tree import PyTree

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

    Example:
        >>> check_state("trace", EmptyState(), EmptyState)
    """
    if not isinstance(state, expected):
        raise TypeError(
            f"{owner} got a state of type {type(state).__name__}, expected {expected.__name__}: "
            f"was it made by another optimizer's init? Build the state with this optimizer's "
            f"init(params)"
        )
