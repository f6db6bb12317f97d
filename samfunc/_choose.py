"""Train steps for methods that choose, step by step, between a full and a cheap step.

A method with a step policy (LookSAM, AE-SAM, ``with_policy``) runs either
both passes or one. Inside a compiled graph that choice would be a branch on
data, so ``ChoosingStep`` makes it in Python and calls one of two pure steps:
compiled with ``samfunc.compile_step``, each kind is its own graph, compiled
once, and training never recompiles. A policy that reads the first gradient
(AE-SAM) has three parts: the first pass, then the rest of a full step or of
a cheap one.

Examples:
    >>> import torch
    >>> import samfunc
    >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
    >>> opt, method = samfunc.sgd(0.1), samfunc.looksam(rho=0.1, k=2)
    >>> step = samfunc.make_train_step(loss_fn, opt, method=method)
    >>> state = samfunc.init_train_state({"w": torch.ones(3)}, opt, method=method)
    >>> for _ in range(4):
    ...     state, metrics = step(state, torch.randn(8, 3))
    >>> samfunc.full_step_fraction(state)
    0.5
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch

from ._base import Pieces
from ._phases import kind_of_step, reads_gradient

__all__ = ["Kind", "PLANNED", "ChoosingStep", "compile_step"]


class Kind(NamedTuple):
    """The kind of step a method with a policy is told to take.

    Attributes:
        full: True for both passes, False for one, None to let the method
            choose (no policy, or outside a ``ChoosingStep``).
        first: the first pass already taken, for a policy that reads it.
    """

    full: Optional[bool] = None
    first: Any = None


#: No kind imposed: the method chooses (or has no policy).
PLANNED = Kind()


StepFn = Callable[..., Any]


class ChoosingStep:
    """``step(state, batch)`` for a method with a step policy; pure parts, chosen in Python.

    The kind of each step comes from the policy's plan of the method's clock
    (``state.method_state.steps``, a CPU tensor: reading it costs no device
    sync), or, for AE-SAM, from the first pass's verdict (one read of a flag).
    It keeps no counter of its own: ``samfunc.full_step_fraction(state)``
    reads the state.

    Attributes:
        full_step: ``full_step(state, batch)``, the pure full step.
        cheap_step: ``cheap_step(state, batch)``, the pure cheap step.
        first_pass: ``first_pass(state, batch) -> FirstPass`` for a policy
            that reads the gradient, else None.
    """

    def __init__(self, step: StepFn, first: StepFn, pieces: Pieces) -> None:
        self.pieces = pieces
        self.name: str = pieces.name
        # Four functions, four code objects: compiled, each is its own graph (one
        # shared code object would make torch.compile guard on the kind and recompile).

        def full_step(state: Any, batch: Any) -> Any:
            return step(state, batch, Kind(True))

        def cheap_step(state: Any, batch: Any) -> Any:
            return step(state, batch, Kind(False))

        def finish_full(state: Any, batch: Any, first: Any) -> Any:
            return step(state, batch, Kind(True, first))

        def finish_cheap(state: Any, batch: Any, first: Any) -> Any:
            return step(state, batch, Kind(False, first))

        self.full_step: StepFn = full_step
        self.cheap_step: StepFn = cheap_step
        self.first_pass: Optional[StepFn] = first if reads_gradient(pieces) else None
        self.finish_full: StepFn = finish_full
        self.finish_cheap: StepFn = finish_cheap

    def _refusal(self) -> RuntimeError:
        return RuntimeError(
            f"this train step ({self.name}) chooses each step's kind in Python: compile it "
            "with samfunc.compile_step(step, ...), which compiles one graph per kind, not "
            "with torch.compile(step)"
        )

    @property
    def __code__(self) -> Any:
        """None (a step is no function); read by ``torch.compile(step)``, which is refused.

        Dynamo reads a callable's ``__code__`` as it starts to trace it, so
        samfunc's error comes first, with or without ``fullgraph``, instead of
        Dynamo's "Observed exception" (fullgraph) or a silent fallback to
        eager (without).
        """
        if torch.compiler.is_compiling():
            raise self._refusal()
        raise AttributeError("__code__")

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """One step: the policy's choice, then the pure step of that kind."""
        if self.first_pass is not None:
            first = self.first_pass(state, batch)
            finish = self.finish_full if bool(first.full) else self.finish_cheap
            result: tuple[Any, Any] = finish(state, batch, first)
            return result
        method_state = state.method_state
        if not hasattr(method_state, "steps"):
            raise ValueError(
                f"{self.name} has a step policy, but state.method_state has no clock: build the "
                "state with init_train_state(..., method=the same method)"
            )
        kind = self.full_step if kind_of_step(self.pieces, method_state) else self.cheap_step
        chosen: tuple[Any, Any] = kind(state, batch)
        return chosen

    def compile(self, **options: Any) -> ChoosingStep:
        """A copy whose pure parts are each ``torch.compile(part, **options)``."""
        compiled = object.__new__(ChoosingStep)
        compiled.__dict__.update(self.__dict__)
        for name in ("full_step", "cheap_step", "finish_full", "finish_cheap", "first_pass"):
            part = getattr(self, name)
            setattr(compiled, name, None if part is None else torch.compile(part, **options))
        return compiled


def compile_step(step: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile`` for a train step: one graph per kind of step for a ``ChoosingStep``.

    Args:
        step: from ``make_train_step`` or ``make_module_train_step``.
        **options: for ``torch.compile`` (``fullgraph=True``, ``mode=...``).

    Examples:
        >>> import torch
        >>> import samfunc
        >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
        >>> step = samfunc.make_train_step(loss_fn, samfunc.sgd(0.1))
        >>> compiled = samfunc.compile_step(step, fullgraph=True)
    """
    if isinstance(step, ChoosingStep):
        return step.compile(**options)
    if not callable(step):
        raise TypeError(f"step must be a train step, got {type(step).__name__}")
    return torch.compile(step, **options)
