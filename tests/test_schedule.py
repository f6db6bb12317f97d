from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc


def torch_scheduler_lrs(
    make: Callable[[torch.optim.Optimizer], Any], steps: int, lr: float
) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make(opt)
    values = []
    for _ in range(steps):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


def ours(schedule: samfunc.Schedule, steps: int) -> list[float]:
    return [float(schedule(torch.tensor(step))) for step in range(steps)]


@given(lr=st.floats(1e-4, 1.0), t_max=st.integers(1, 50), alpha=st.floats(0.0, 0.5))
def test_cosine_decay_matches_cosine_annealing_lr(lr: float, t_max: int, alpha: float) -> None:
    expected = torch_scheduler_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=t_max, eta_min=alpha * lr),
        t_max + 1,
        lr,
    )
    actual = ours(samfunc.cosine_decay_schedule(lr, t_max, alpha), t_max + 1)
    assert actual == pytest.approx(expected, rel=1e-5, abs=1e-7)


@given(lr=st.floats(1e-4, 1.0), step_size=st.integers(1, 10), gamma=st.floats(0.05, 0.95))
def test_step_schedule_matches_step_lr(lr: float, step_size: int, gamma: float) -> None:
    expected = torch_scheduler_lrs(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma), 40, lr
    )
    assert ours(samfunc.step_schedule(lr, step_size, gamma), 40) == pytest.approx(
        expected, rel=1e-5
    )


@given(
    lr=st.floats(1e-4, 1.0),
    milestones=st.lists(st.integers(1, 30), min_size=1, max_size=4, unique=True),
    gamma=st.floats(0.05, 0.95),
)
def test_multistep_schedule_matches_multistep_lr(
    lr: float, milestones: list[int], gamma: float
) -> None:
    expected = torch_scheduler_lrs(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=milestones, gamma=gamma),
        35,
        lr,
    )
    actual = ours(samfunc.multistep_schedule(lr, milestones, gamma), 35)
    assert actual == pytest.approx(expected, rel=1e-5)


def test_known_values() -> None:
    lin = samfunc.linear_schedule(1.0, 3.0, transition_steps=4, transition_begin=2)
    assert ours(lin, 8) == pytest.approx([1.0, 1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0])
    assert ours(samfunc.constant_schedule(0.3), 3) == pytest.approx([0.3] * 3)
    cos = samfunc.cosine_decay_schedule(2.0, decay_steps=4)
    assert ours(cos, 6) == pytest.approx(
        [2.0, 1.0 + math.cos(math.pi / 4), 1.0, 1.0 - math.cos(math.pi / 4), 0.0, 0.0], abs=1e-6
    )
    warm = samfunc.warmup_cosine_decay_schedule(
        0.0, 1.0, warmup_steps=2, decay_steps=6, end_value=0.2
    )
    assert ours(warm, 8) == pytest.approx(
        [
            0.0,
            0.5,
            1.0,
            0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2,
            0.6,
            0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2,
            0.2,
            0.2,
        ],
        abs=1e-6,
    )


def test_join_schedules_restarts_the_count_at_each_boundary() -> None:
    joined = samfunc.join_schedules(
        [
            samfunc.constant_schedule(5.0),
            samfunc.linear_schedule(0.0, 1.0, 10),
            samfunc.constant_schedule(7.0),
        ],
        [3, 8],
    )
    assert ours(joined, 10) == pytest.approx([5, 5, 5, 0.0, 0.1, 0.2, 0.3, 0.4, 7, 7])


def test_schedules_return_float32_tensors_on_the_count_device() -> None:
    for schedule in (
        samfunc.constant_schedule(1.0),
        samfunc.cosine_decay_schedule(1.0, 10),
        samfunc.multistep_schedule(1.0, [2]),
        samfunc.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10),
    ):
        value = schedule(torch.tensor(3, dtype=torch.int64))
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.ndim == 0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: samfunc.cosine_decay_schedule(1.0, 0), "decay_steps must be >= 1, got 0"),
        (lambda: samfunc.step_schedule(1.0, 5, gamma=0.0), "gamma must be > 0, got 0.0"),
        (lambda: samfunc.multistep_schedule(1.0, [-1]), "milestones must be ints >= 0"),
        (
            lambda: samfunc.join_schedules([samfunc.constant_schedule(1.0)], [3]),
            "len(boundaries) + 1",
        ),
        (
            lambda: samfunc.warmup_cosine_decay_schedule(0.0, 1.0, 5, 5),
            "decay_steps must be > warmup_steps",
        ),
        (
            lambda: samfunc.linear_schedule(0.0, 1.0, 5, transition_begin=-1),
            "transition_begin must be >= 0",
        ),
    ],
)
def test_schedules_validate_on_build(build: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)
