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

import math
from functools import partial
from typing import Any, NamedTuple, Optional, Union

import torch

from . import _tree
from ._base import Params, Schedule, StepPolicy
from ._validate import check_in_interval, check_number, check_positive_int

__all__ = [
    "PolicyState",
    "SharpStepsState",
    "every_n_steps",
    "from_step",
    "sharp_steps",
    "policy_counters",
    "full_step_fraction",
]


class PolicyState(NamedTuple):
    """The counters every policy keeps (on the CPU, so reading them costs no device sync).

    Attributes:
        steps: steps taken.
        full_steps: how many of them were full steps.
    """

    steps: torch.Tensor
    full_steps: torch.Tensor


def _counter() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def _counters_init(params: Params) -> PolicyState:
    del params
    return PolicyState(_counter(), _counter())


def every_n_steps(n: int, offset: int = 0) -> StepPolicy:
    """A full step every ``n`` steps (steps ``offset``, ``offset + n``, ...), cheap ones between.

    With ``offset=0`` (LookSAM's ``k``) step 0 is full. MosaicML Composer's
    SAM ``interval`` runs SAM on the last step of each interval, which is
    ``offset=n - 1``. ``n=1`` is every step.

    Examples:
        >>> import samfunc
        >>> policy = samfunc.every_n_steps(3)
        >>> [policy.plan(step) for step in range(4)]
        [True, False, False, True]
    """
    n = check_positive_int("n", n)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < n:
        raise ValueError(f"offset must be an int in [0, n) = [0, {n}), got {offset!r}")

    def plan(count: int) -> bool:
        return count % n == offset

    return StepPolicy(_counters_init, plan, name=f"every_n_steps({n})")


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

    def plan(count: int) -> bool:
        return count >= start

    return StepPolicy(_counters_init, plan, name=f"from_step({start})")


class SharpStepsState(NamedTuple):
    """AE-SAM's policy state: the counters and the running statistics of ``||g||^2``.

    Attributes:
        steps: steps taken.
        full_steps: how many were full (SAM) steps.
        mean: the running mean of ``||g||^2`` (float32, on the gradient's device).
        variance: its running variance.
    """

    steps: torch.Tensor
    full_steps: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor


#: AE-SAM's starting statistics (mean 0, variance e^-10).
MEAN_INIT = 0.0
VARIANCE_INIT = math.exp(-10.0)


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
            step count. The paper moves it linearly over training,
            ``samfunc.linear_schedule(1.0, -1.0, total_steps)`` (lambda2 = 1 to
            lambda1 = -1), so full steps grow more frequent late in training.
            Smaller ``c``, more full steps (``c = 0``: about half of them).
        delta: the moving averages' coefficient.

    Examples:
        >>> import samfunc
        >>> policy = samfunc.sharp_steps(c=0.0, delta=0.9)
    """
    c = check_c(c)
    delta = check_in_interval("delta", delta, 0.0, 1.0)

    def init(params: Params) -> SharpStepsState:
        leaves = _tree.leaves(params)
        dtype = torch.float64 if any(leaf.dtype == torch.float64 for leaf in leaves) else None
        device = leaves[0].device if leaves else None
        stat = partial(torch.full, (), dtype=dtype or torch.float32, device=device)
        return SharpStepsState(_counter(), _counter(), stat(MEAN_INIT), stat(VARIANCE_INIT))

    def plan(steps: int) -> None:
        del steps

    def decide(sq_norm: torch.Tensor, state: Any) -> tuple[torch.Tensor, SharpStepsState]:
        sq_norm = sq_norm.to(state.mean.dtype)
        mean = delta * state.mean + (1.0 - delta) * sq_norm
        variance = delta * state.variance + (1.0 - delta) * (sq_norm - mean) ** 2
        threshold = c(state.steps) if callable(c) else c
        full = sq_norm >= mean + threshold * variance.sqrt()
        return full, state._replace(mean=mean, variance=variance)

    return StepPolicy(init, plan, decide, name="sharp_steps")


def policy_counters(method_state: Any) -> Optional[PolicyState]:
    """The ``steps`` and ``full_steps`` of a method state's policy, or None if it has none."""
    policy: Any = getattr(method_state, "policy", None)
    if not hasattr(policy, "full_steps"):
        return None
    return PolicyState(policy.steps, policy.full_steps)


def full_step_fraction(method_state: Any) -> float:
    """The fraction of the steps so far that were full (1.0 for a method without a policy).

    Examples:
        >>> import torch
        >>> import samfunc
        >>> method = samfunc.looksam(rho=0.1, k=4)
        >>> samfunc.full_step_fraction(method.init({"w": torch.ones(2)}))
        nan
    """
    counters = policy_counters(method_state)
    if counters is None:
        return 1.0
    count = int(counters.steps)
    return float("nan") if count == 0 else int(counters.full_steps) / count


def check_c(c: Any) -> Union[float, Schedule]:
    """AE-SAM's threshold ``c``: a number or a schedule of the step count."""
    return c if callable(c) else check_number("c", c)
