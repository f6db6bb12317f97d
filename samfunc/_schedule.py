"""Schedules: functions from the step count to a value, tensors in and out.

A schedule takes the integer step count as a 0-d tensor (it lives in optimizer
state) and returns a float32 0-d tensor computed with tensor ops only, so a
changing count neither breaks a ``torch.compile`` graph nor recompiles it.
Python ints are accepted too, for convenience.

Examples:
    >>> import torch
    >>> import samfunc
    >>> sched = samfunc.cosine_decay_schedule(0.1, decay_steps=100)
    >>> round(float(sched(torch.tensor(50))), 6)
    0.05
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch

from ._base import Schedule
from ._validate import check_nonnegative, check_number, check_positive, check_positive_int

__all__ = [
    "schedule_range",
    "check_schedule_nonnegative",
    "constant_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "step_schedule",
    "multistep_schedule",
    "join_schedules",
    "warmup_cosine_decay_schedule",
    "group_learning_rate",
    "group_learning_rates",
]


def _as_float(count: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(count).to(torch.float32)


_RANGE_ATTR = "_samfunc_value_range"


def _with_range(schedule: Schedule, low: float, high: float) -> Schedule:
    """Records the lowest and highest value ``schedule`` can return, for build-time checks.

    ``schedule`` is a ``functools.partial``: its attributes are pickled and copied with it.
    """
    setattr(schedule, _RANGE_ATTR, (float(low), float(high)))
    return schedule


def schedule_range(schedule: Schedule) -> tuple[float, float] | None:
    """``(lowest, highest)`` value of one of samfunc's schedules; None for other callables.

    Examples:
        >>> schedule_range(linear_schedule(0.1, -0.1, transition_steps=10))
        (-0.1, 0.1)
    """
    found = getattr(schedule, _RANGE_ATTR, None)
    return None if found is None else (found[0], found[1])


def check_schedule_nonnegative(name: str, schedule: Schedule) -> Schedule:
    """Rejects, when a step or optimizer is built, a schedule known to go below 0.

    Only samfunc's schedules know their range; any other callable is accepted
    as it is (a negative or non-finite rho from it is caught at run time by
    the step's non-finite policy).

    Examples:
        >>> check_schedule_nonnegative("rho", linear_schedule(0.1, -0.1, 10))
        Traceback (most recent call last):
        ...
        ValueError: rho schedule goes below 0: its values reach -0.1
    """
    if not callable(schedule):
        raise TypeError(f"{name} must be a number or a schedule (callable), got {schedule!r}")
    bounds = schedule_range(schedule)
    if bounds is not None and bounds[0] < 0:
        raise ValueError(f"{name} schedule goes below 0: its values reach {bounds[0]:g}")
    return schedule


def constant_schedule(value: float) -> Schedule:
    """Returns ``value`` at every step.

    Examples:
        >>> float(constant_schedule(0.5)(7))
        0.5
    """
    value = check_number("value", value)
    return _with_range(functools.partial(_constant, value=value), value, value)


def _constant(count: torch.Tensor, *, value: float) -> torch.Tensor:
    """``constant_schedule``'s value at ``count``."""
    return torch.full_like(_as_float(count), value)


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Goes linearly from ``init_value`` to ``end_value`` over ``transition_steps``.

    The value is ``init_value`` before ``transition_begin`` and ``end_value``
    from ``transition_begin + transition_steps`` on.

    Examples:
        >>> float(linear_schedule(0.0, 1.0, transition_steps=4)(1))
        0.25
    """
    init_value = check_number("init_value", init_value)
    end_value = check_number("end_value", end_value)
    transition_steps = check_positive_int("transition_steps", transition_steps)
    if isinstance(transition_begin, bool) or not isinstance(transition_begin, int):
        raise TypeError(f"transition_begin must be an int, got {transition_begin!r}")
    if transition_begin < 0:
        raise ValueError(f"transition_begin must be >= 0, got {transition_begin}")
    schedule = functools.partial(
        _linear,
        init_value=init_value,
        end_value=end_value,
        transition_steps=transition_steps,
        transition_begin=transition_begin,
    )
    return _with_range(schedule, min(init_value, end_value), max(init_value, end_value))


def _linear(
    count: torch.Tensor,
    *,
    init_value: float,
    end_value: float,
    transition_steps: int,
    transition_begin: int,
) -> torch.Tensor:
    """``linear_schedule``'s value at ``count``."""
    progress = ((_as_float(count) - transition_begin) / transition_steps).clamp(0.0, 1.0)
    return init_value + (end_value - init_value) * progress


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``.

    Equals ``torch.optim.lr_scheduler.CosineAnnealingLR`` with
    ``T_max=decay_steps`` and ``eta_min=alpha * init_value`` for steps up to
    ``decay_steps``; it stays at the final value after that.

    Examples:
        >>> round(float(cosine_decay_schedule(1.0, 10, alpha=0.1)(10)), 6)
        0.1
    """
    init_value = check_number("init_value", init_value)
    decay_steps = check_positive_int("decay_steps", decay_steps)
    alpha = check_nonnegative("alpha", alpha)

    return _cosine_between(init_value, alpha * init_value, decay_steps)


def _cosine_between(start: float, end: float, steps: int) -> Schedule:
    schedule = functools.partial(_cosine, start=start, end=end, steps=steps)
    return _with_range(schedule, min(start, end), max(start, end))


def _cosine(count: torch.Tensor, *, start: float, end: float, steps: int) -> torch.Tensor:
    """The value at ``count`` of a cosine from ``start`` to ``end`` over ``steps``."""
    progress = _as_float(count).clamp(0.0, steps) / steps
    return end + (start - end) * 0.5 * (1.0 + torch.cos(math.pi * progress))


def step_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiplies by ``gamma`` every ``step_size`` steps (``StepLR``).

    Examples:
        >>> round(float(step_schedule(1.0, step_size=10, gamma=0.5)(25)), 6)
        0.25
    """
    init_value = check_number("init_value", init_value)
    step_size = check_positive_int("step_size", step_size)
    gamma = check_positive("gamma", gamma)
    schedule = functools.partial(
        _step_decay, init_value=init_value, step_size=step_size, gamma=gamma
    )
    return _with_range(schedule, *_geometric_range(init_value, gamma))


def _step_decay(
    count: torch.Tensor, *, init_value: float, step_size: int, gamma: float
) -> torch.Tensor:
    """``step_schedule``'s value at ``count``."""
    decays = torch.floor(_as_float(count) / step_size)
    return _geometric(init_value, gamma, decays)


def _geometric(init_value: float, gamma: float, decays: torch.Tensor) -> torch.Tensor:
    """``init_value * gamma**decays`` as float32, in log space and float64 where available.

    ``gamma**k`` alone can overflow (2**1024) while the product fits
    (1e-300 * 2**1024 = 1.8e8); ``log|init| + k log(gamma)`` cannot.
    """
    wide = torch.float32 if decays.device.type == "mps" else torch.float64
    exponent = decays.to(wide)
    if init_value == 0.0:
        return torch.zeros_like(exponent, dtype=torch.float32)
    log_value = math.log(abs(init_value)) + exponent * math.log(gamma)
    return (math.copysign(1.0, init_value) * torch.exp(log_value)).to(torch.float32)


def _geometric_range(init_value: float, gamma: float) -> tuple[float, float]:
    """Range of ``init_value * gamma**k`` over k >= 0 (gamma > 0): it keeps its sign."""
    if gamma <= 1.0:
        return (min(0.0, init_value), max(0.0, init_value))
    return (-math.inf, init_value) if init_value < 0 else (init_value, math.inf)


def multistep_schedule(
    init_value: float, milestones: Sequence[int], gamma: float = 0.1
) -> Schedule:
    """Multiplies by ``gamma`` at each milestone step (``MultiStepLR``).

    Examples:
        >>> round(float(multistep_schedule(1.0, [2, 5], gamma=0.1)(5)), 6)
        0.01
    """
    init_value = check_number("init_value", init_value)
    gamma = check_positive("gamma", gamma)
    for milestone in milestones:
        if isinstance(milestone, bool) or not isinstance(milestone, int) or milestone < 0:
            raise ValueError(f"milestones must be ints >= 0, got {list(milestones)}")
    schedule = functools.partial(
        _multistep_decay, init_value=init_value, milestones=sorted(milestones), gamma=gamma
    )
    low, high = _geometric_range(init_value, gamma)
    return _with_range(schedule, low, high)


def _multistep_decay(
    count: torch.Tensor, *, init_value: float, milestones: list[int], gamma: float
) -> torch.Tensor:
    """``multistep_schedule``'s value at ``count``."""
    count_f = _as_float(count)
    decays = torch.zeros_like(count_f)
    for milestone in milestones:
        decays = decays + (count_f >= milestone).to(torch.float32)
    return _geometric(init_value, gamma, decays)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[i + 1]`` from step ``boundaries[i]`` on, restarting its count.

    Examples:
        >>> warm = linear_schedule(0.0, 1.0, transition_steps=10)
        >>> flat = constant_schedule(1.0)
        >>> float(join_schedules([warm, flat], [10])(15))
        1.0
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules needs len(schedules) == len(boundaries) + 1, "
            f"got {len(schedules)} schedules and {len(boundaries)} boundaries"
        )
    if list(boundaries) != sorted(boundaries) or any(b < 0 for b in boundaries):
        raise ValueError(f"boundaries must be non-negative and increasing, got {list(boundaries)}")
    schedule = functools.partial(_joined, schedules=list(schedules), boundaries=list(boundaries))
    ranges = [schedule_range(part) for part in schedules]
    if any(r is None for r in ranges):
        return schedule
    known = [r for r in ranges if r is not None]
    return _with_range(schedule, min(r[0] for r in known), max(r[1] for r in known))


def _joined(
    count: torch.Tensor, *, schedules: list[Schedule], boundaries: list[int]
) -> torch.Tensor:
    """``join_schedules``'s value at ``count``."""
    count_t = torch.as_tensor(count)
    value = schedules[0](count_t)
    for boundary, later in zip(boundaries, schedules[1:]):
        value = torch.where(count_t >= boundary, later(count_t - boundary), value)
    return value


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the whole schedule, warmup included (as in optax).

    Examples:
        >>> sched = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110)
        >>> float(sched(10))
        1.0
    """
    peak_value = check_number("peak_value", peak_value)
    end_value = check_number("end_value", end_value)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps)
    decay_steps = check_positive_int("decay_steps", decay_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps must be > warmup_steps ({warmup_steps}), got {decay_steps}")
    warmup = linear_schedule(init_value, peak_value, warmup_steps)
    decay = _cosine_between(peak_value, end_value, decay_steps - warmup_steps)
    return join_schedules([warmup, decay], [warmup_steps])


# --- the learning rate of samfunc.SAM's param_groups --------------------------------------------

#: The learning rates of the param_groups of the samfunc.SAM whose step is running (None outside).
_GROUP_LEARNING_RATES: contextvars.ContextVar[Optional[tuple[float, ...]]] = contextvars.ContextVar(
    "samfunc_group_learning_rates", default=None
)


def group_learning_rate(group: int = 0) -> Schedule:
    """The learning rate in ``samfunc.SAM``'s ``param_groups[group]`` at this step, as a schedule.

    What a ``torch.optim.lr_scheduler`` set (or you did) is read when the
    step runs, so ``rho_from_learning_rate(group_learning_rate(), ...)``
    gives GSAM's rho in the class with the torch scheduler alone, as the
    authors' loop does with theirs. It runs only inside ``SAM.step`` and
    ``SAM.first_step``; a functional step has no param_groups: give
    ``rho_from_learning_rate`` the learning-rate schedule itself.

    Args:
        group: which param group's ``lr``.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> rho = samfunc.rho_from_learning_rate(
        ...     group_learning_rate(), rho_max=0.1, rho_min=0.0, lr_max=0.2, lr_min=0.0
        ... )
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = samfunc.SAM([w], torch.optim.SGD, lr=0.2, method=samfunc.gsam(rho=rho))
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    """
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ValueError(f"group must be an int >= 0, got {group!r}")
    return _GroupLearningRate(group)


@dataclasses.dataclass(frozen=True)
class _GroupLearningRate:
    group: int

    def __call__(self, count: torch.Tensor | int) -> torch.Tensor:
        del count  # the scheduler moved the learning rate already
        rates = _GROUP_LEARNING_RATES.get()
        if rates is None:
            raise RuntimeError(
                "group_learning_rate() reads the lr of samfunc.SAM's param_groups, so it runs "
                "only inside SAM.step(closure) or SAM.first_step(); in a functional step, give "
                "rho_from_learning_rate the learning-rate schedule itself"
            )
        if self.group >= len(rates):
            raise IndexError(
                f"group_learning_rate({self.group}): this optimizer has {len(rates)} param groups"
            )
        return torch.tensor(rates[self.group], dtype=torch.float64)


@contextlib.contextmanager
def group_learning_rates(groups: Sequence[dict[str, Any]]) -> Iterator[None]:
    """Makes ``group_learning_rate`` read these groups' ``lr`` (the class, around its step)."""
    rates = tuple(float(group["lr"]) if "lr" in group else math.nan for group in groups)
    token = _GROUP_LEARNING_RATES.set(rates)
    try:
        yield
    finally:
        _GROUP_LEARNING_RATES.reset(token)
