"""Step policies: which steps of a method are full (both passes) and which are cheap (one pass).

A policy is a ``StepPolicy(init, plan, decide)``. ``plan(count)`` answers in
Python from the step number; AE-SAM's answers None and lets ``decide`` read
the first pass's gradient. Either way the choice is a Python ``bool`` by the
time the rest of the step runs, so a compiled step is two graphs (three for
a policy that reads the gradient), chosen in Python: see
``samfunc.compile_step``.

Examples:
    >>> import samfunc
    >>> method = samfunc.with_policy(samfunc.sam(0.05), samfunc.every_n_steps(5))
    >>> [samfunc.every_n_steps(5).plan(step) for step in range(6)]
    [True, False, False, False, False, True]
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, NamedTuple, Union

import torch

from . import _tree
from ._base import Params, Schedule, StepPolicy, check_state
from ._validate import check_in_interval, check_number, check_positive_int

__all__ = [
    "SharpStepsState",
    "every_n_steps",
    "from_step",
    "sharp_steps",
    "full_step_fraction",
]


def _no_state(params: Params) -> tuple[()]:
    del params
    return ()


@dataclasses.dataclass(frozen=True)
class _EveryNSteps:
    n: int
    offset: int

    def plan(self, count: int) -> bool:
        return count % self.n == self.offset


def every_n_steps(n: int, offset: int = 0) -> StepPolicy:
    """A full step every ``n`` steps (steps ``offset``, ``offset + n``, ...), cheap ones between.

    With ``offset=0`` (LookSAM's ``k``) step 0 is full. MosaicML Composer's
    SAM ``interval`` runs SAM on the last step of each interval, which is
    ``offset=n - 1``. ``n=1`` is every step. Steps are counted by the one
    clock, the number of updates applied (``MethodState.steps``).

    Examples:
        >>> import samfunc
        >>> policy = samfunc.every_n_steps(3)
        >>> [policy.plan(step) for step in range(4)]
        [True, False, False, True]
    """
    n = check_positive_int("n", n)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < n:
        raise ValueError(f"offset must be an int in [0, n) = [0, {n}), got {offset!r}")
    return StepPolicy(_no_state, _EveryNSteps(n, offset).plan, name=f"every_n_steps({n})")


@dataclasses.dataclass(frozen=True)
class _FromStep:
    start: int

    def plan(self, count: int) -> bool:
        return count >= self.start


def from_step(start: int) -> StepPolicy:
    """Cheap steps before step ``start``, full steps from it on: late-phase SAM.

    Zhou et al. (ICLR 2025) find that SAM applied only over the last part of
    training reaches minima as flat as SAM throughout: with ``T`` steps in all,
    ``from_step(int(0.8 * T))`` runs SAM over the last fifth only.

    Examples:
        >>> import samfunc
        >>> [samfunc.from_step(2).plan(step) for step in range(4)]
        [False, False, True, True]
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    return StepPolicy(_no_state, _FromStep(start).plan, name=f"from_step({start})")


class SharpStepsState(NamedTuple):
    """AE-SAM's policy state: the running statistics of ``||g||^2``.

    Attributes:
        mean: the running mean of ``||g||^2`` (float32, or float64 for float64
            params, on the gradient's device).
        variance: its running variance.
    """

    mean: torch.Tensor
    variance: torch.Tensor


#: AE-SAM's starting statistics (mean 0, variance e^-10).
MEAN_INIT = 0.0
VARIANCE_INIT = math.exp(-10.0)


@dataclasses.dataclass(frozen=True)
class _SharpSteps:
    c: Union[float, Schedule]
    delta: float

    def init(self, params: Params) -> SharpStepsState:
        leaves = _tree.leaves(params)
        dtype = torch.float64 if any(leaf.dtype == torch.float64 for leaf in leaves) else None
        device = leaves[0].device if leaves else None
        stat = partial(torch.full, (), dtype=dtype or torch.float32, device=device)
        return SharpStepsState(stat(MEAN_INIT), stat(VARIANCE_INIT))

    def plan(self, count: int) -> None:
        del count

    def decide(
        self, sq_norm: torch.Tensor, state: Any, count: torch.Tensor
    ) -> tuple[torch.Tensor, SharpStepsState]:
        check_state("sharp_steps", state, SharpStepsState)
        sq_norm = sq_norm.to(state.mean.dtype)
        mean = self.delta * state.mean + (1.0 - self.delta) * sq_norm
        variance = self.delta * state.variance + (1.0 - self.delta) * (sq_norm - mean) ** 2
        threshold = self.c(count) if callable(self.c) else self.c
        full = sq_norm >= mean + threshold * variance.sqrt()
        return full, SharpStepsState(mean, variance)


def sharp_steps(c: Union[float, Schedule] = 0.0, delta: float = 0.9) -> StepPolicy:
    """AE-SAM's policy (Jiang et al., ICLR 2023): a full step when ``||g||^2`` is unusually large.

    Each step, with ``s = ||g||^2`` of the first pass's gradient::

        mean     <- delta mean + (1 - delta) s
        variance <- delta variance + (1 - delta) (s - mean)^2     (the new mean)
        full step  iff  s >= mean + c sqrt(variance)

    from ``mean = 0``, ``variance = e^-10``. A large ``||g||`` marks a sharp
    region, where the SAM step pays; elsewhere the plain gradient is used.

    Args:
        c: the threshold in standard deviations: a float, or a schedule of the
            step count (the updates applied). The paper moves it linearly over
            training, ``samfunc.linear_schedule(1.0, -1.0, total_steps)``
            (lambda2 = 1 to lambda1 = -1), so full steps grow more frequent
            late in training. Smaller ``c``, more full steps (``c = 0``: about
            half of them).
        delta: the moving averages' coefficient.

    Examples:
        >>> import samfunc
        >>> policy = samfunc.sharp_steps(c=0.0, delta=0.9)
    """
    built = _SharpSteps(check_c(c), check_in_interval("delta", delta, 0.0, 1.0))
    return StepPolicy(built.init, built.plan, built.decide, name="sharp_steps")


def full_step_fraction(state: Any) -> float:
    """The fraction of the updates so far that took the full step (both passes).

    Takes a method state, a ``TrainState`` (its ``method_state``) or a
    ``samfunc.SAM`` optimizer (its ``method_state``). A method without a
    policy takes the full step every time (1.0 once it has stepped); NaN
    before the first update. A one-pass method (Momentum-SAM, MESA) never does (0.0).

    Examples:
        >>> import torch
        >>> import samfunc
        >>> method = samfunc.looksam(rho=0.1, k=4)
        >>> samfunc.full_step_fraction(method.init({"w": torch.ones(2)}))
        nan
    """
    method_state = getattr(state, "method_state", state)
    if method_state is None and hasattr(state, "param_groups"):
        raise TypeError(
            "this samfunc.SAM holds no method state: without method= it takes the full step "
            "every time (the fraction is 1), and with one it has none before its first step"
        )
    count = getattr(method_state, "steps", None)
    full_steps = getattr(method_state, "full_steps", None)
    if not isinstance(count, torch.Tensor) or not isinstance(full_steps, torch.Tensor):
        what = type(method_state).__name__
        bare = " (a bare Method(init, grad) keeps no clock)" if method_state == () else ""
        raise TypeError(
            "full_step_fraction takes the state of a method built from pieces (samfunc.sam(), "
            f"looksam(), ...), a TrainState or a samfunc.SAM holding one, got {what}{bare}"
        )
    steps = int(count)
    return float("nan") if steps == 0 else int(full_steps) / steps


def check_c(c: Any) -> Union[float, Schedule]:
    """AE-SAM's threshold ``c``: a number or a schedule of the step count."""
    return c if callable(c) else check_number("c", c)
