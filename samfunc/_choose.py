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
    >>> step.full_steps, step.steps
    (2, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch

__all__ = ["Kind", "PLANNED", "ChoosingStep", "chooses", "compile_step"]


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


def chooses(grad: Any) -> bool:
    """Whether a method's ``grad`` has a step policy (so a train step must choose)."""
    return getattr(grad, "policy", None) is not None


StepFn = Callable[..., Any]


class ChoosingStep:
    """``step(state, batch)`` for a method with a step policy; pure parts, chosen in Python.

    The kind of each step comes from the policy's counters in
    ``state.method_state`` (CPU tensors: reading them costs no device sync),
    or, for AE-SAM, from the first pass's verdict (one read of a flag).

    Attributes:
        full_step: ``full_step(state, batch)``, the pure full step.
        cheap_step: ``cheap_step(state, batch)``, the pure cheap step.
        first_pass: ``first_pass(state, batch) -> FirstPass`` for a policy
            that reads the gradient, else None.
        steps: steps run through this object; ``full_steps``: full ones.
    """

    def __init__(self, step: StepFn, first: StepFn, grad: Any) -> None:
        self._grad = grad
        self.name: str = getattr(grad, "name", "method")
        self.reads_gradient: bool = bool(getattr(grad, "reads_gradient", False))
        self.full_step: StepFn = lambda state, batch: step(state, batch, Kind(True))
        self.cheap_step: StepFn = lambda state, batch: step(state, batch, Kind(False))
        self.first_pass: Optional[StepFn] = first if self.reads_gradient else None
        self.finish_full: StepFn = lambda state, batch, f: step(state, batch, Kind(True, f))
        self.finish_cheap: StepFn = lambda state, batch, f: step(state, batch, Kind(False, f))
        self.steps = 0
        self.full_steps = 0

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """One step: the policy's choice, then the pure step of that kind."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"this train step ({self.name}) chooses each step's kind in Python: compile it "
                "with samfunc.compile_step(step, ...), which compiles one graph per kind, not "
                "with torch.compile(step)"
            )
        if self.first_pass is not None:
            first = self.first_pass(state, batch)
            full = bool(first.full)
            new, metrics = (self.finish_full if full else self.finish_cheap)(state, batch, first)
        else:
            full = self._planned(state)
            new, metrics = (self.full_step if full else self.cheap_step)(state, batch)
        self.steps += 1
        self.full_steps += int(full)
        return new, metrics

    def _planned(self, state: Any) -> bool:
        policy = getattr(state.method_state, "policy", ())
        if not hasattr(policy, "steps"):
            raise ValueError(
                f"{self.name} has a step policy, but state.method_state has no policy state: "
                "build the state with init_train_state(..., method=the same method)"
            )
        return bool(self._grad.planned(state.method_state))

    def compile(self, **options: Any) -> ChoosingStep:
        """A copy whose pure parts are each ``torch.compile(part, **options)``."""
        compiled = object.__new__(ChoosingStep)
        compiled.__dict__.update(self.__dict__)
        for name in ("full_step", "cheap_step", "finish_full", "finish_cheap", "first_pass"):
            part = getattr(self, name)
            setattr(compiled, name, None if part is None else torch.compile(part, **options))
        compiled.steps = compiled.full_steps = 0
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
