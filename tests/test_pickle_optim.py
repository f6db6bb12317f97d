"""Transforms, optimizer aliases, schedules and loss scales survive pickle, deepcopy and torch.save.

A copy must run bitwise like the original; a schedule's copy keeps its range;
optimizer states load with ``torch.load(weights_only=True)`` (samfunc
allow-lists its state NamedTuples on import, see ``samfunc._serialization``).
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any, Callable

import pytest
import torch

import samfunc
from samfunc import _tree
from samfunc._schedule import schedule_range

from .helpers import assert_trees_equal

STEPS = 5

RoundTrip = Callable[[Any], Any]


def pickled(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def deep_copied(obj: Any) -> Any:
    return copy.deepcopy(obj)


def torch_saved(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = pytest.mark.parametrize(
    "round_trip", [pickled, deep_copied, torch_saved], ids=["pickle", "deepcopy", "torch.save"]
)


def warmup_cosine() -> samfunc.Schedule:
    return samfunc.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=2, decay_steps=6)


SCHEDULES: dict[str, Callable[[], samfunc.Schedule]] = {
    "constant": lambda: samfunc.constant_schedule(0.5),
    "linear": lambda: samfunc.linear_schedule(0.1, -0.2, transition_steps=7, transition_begin=3),
    "cosine_decay": lambda: samfunc.cosine_decay_schedule(0.3, decay_steps=9, alpha=0.1),
    "step": lambda: samfunc.step_schedule(2.0, step_size=3, gamma=0.5),
    "step_growing": lambda: samfunc.step_schedule(-1.0, step_size=4, gamma=3.0),
    "multistep": lambda: samfunc.multistep_schedule(1.0, [7, 2, 5], gamma=0.3),
    "join": lambda: samfunc.join_schedules(
        [
            samfunc.constant_schedule(1.0),
            samfunc.linear_schedule(1.0, 0.0, 5),
            samfunc.constant_schedule(0.0),
        ],
        [3, 8],
    ),
    "warmup_cosine_decay": warmup_cosine,
}

# Every public transform of _transform.py, with each kind of hyperparameter it takes.
TRANSFORMS: dict[str, Callable[[], samfunc.GradientTransformation]] = {
    "identity": samfunc.identity,
    "scale": lambda: samfunc.scale(-0.3),
    "scale_by_schedule": lambda: samfunc.scale_by_schedule(warmup_cosine()),
    "scale_by_learning_rate": lambda: samfunc.scale_by_learning_rate(0.1),
    "scale_by_learning_rate_schedule": lambda: samfunc.scale_by_learning_rate(warmup_cosine()),
    "scale_by_learning_rate_no_flip": lambda: samfunc.scale_by_learning_rate(
        warmup_cosine(), flip_sign=False
    ),
    "trace": lambda: samfunc.trace(0.9),
    "trace_dampening": lambda: samfunc.trace(0.9, dampening=0.3),
    "trace_nesterov": lambda: samfunc.trace(0.8, nesterov=True),
    "scale_by_adam": lambda: samfunc.scale_by_adam(0.8, 0.95, eps=1e-6),
    "add_decayed_weights": lambda: samfunc.add_decayed_weights(0.1),
    "add_decayed_weights_zero": lambda: samfunc.add_decayed_weights(0.0),
    "decoupled_weight_decay": lambda: samfunc.decoupled_weight_decay(0.1, weight_decay=0.3),
    "decoupled_weight_decay_schedule": lambda: samfunc.decoupled_weight_decay(
        warmup_cosine(), weight_decay=0.3
    ),
    "clip_by_global_norm": lambda: samfunc.clip_by_global_norm(0.5),
}

ALIASES: dict[str, Callable[[], samfunc.GradientTransformation]] = {
    "sgd": lambda: samfunc.sgd(0.1),
    "sgd_momentum_schedule": lambda: samfunc.sgd(
        warmup_cosine(), momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "sgd_dampening": lambda: samfunc.sgd(0.1, momentum=0.9, dampening=0.5),
    "adam": lambda: samfunc.adam(1e-2, weight_decay=0.1),
    "adam_schedule": lambda: samfunc.adam(warmup_cosine()),
    "adamw": lambda: samfunc.adamw(warmup_cosine(), weight_decay=0.05),
}


def params() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=generator, dtype=torch.float64),
        "b": torch.randn(5, generator=generator, dtype=torch.float64),
    }


def gradients(steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "w": torch.randn(3, 4, generator=generator, dtype=torch.float64),
            "b": torch.randn(5, generator=generator, dtype=torch.float64),
        }
        for _ in range(steps)
    ]


def run(opt: samfunc.GradientTransformation, steps: int = STEPS) -> list[Any]:
    """Every update, state and params of ``steps`` updates from ``params()``."""
    p = params()
    state = opt.init(p)
    trajectory = [state]
    for g in gradients(steps):
        updates, state = opt.update(g, state, p)
        p = samfunc.apply_updates(p, updates)
        trajectory.append((updates, state, p))
    return trajectory


def run_in_sequence(
    transforms: tuple[samfunc.GradientTransformation, ...], steps: int = STEPS
) -> list[Any]:
    """``run`` of the transforms applied one after the other, as ``chain`` would, without it."""
    p = params()
    states = [t.init(p) for t in transforms]
    trajectory: list[Any] = [tuple(states)]
    for g in gradients(steps):
        updates = g
        for i, t in enumerate(transforms):
            updates, states[i] = t.update(updates, states[i], p)
        p = samfunc.apply_updates(p, updates)
        trajectory.append((updates, tuple(states), p))
    return trajectory


@ROUND_TRIPS
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_copy_runs_bitwise_like_the_original(name: str, round_trip: RoundTrip) -> None:
    original = TRANSFORMS[name]()
    copied = round_trip(original)
    assert isinstance(copied, samfunc.GradientTransformation)
    assert_trees_equal(run(original), run(copied))


@ROUND_TRIPS
def test_sgd_with_momentum_and_a_schedule_from_its_parts_runs_bitwise(
    round_trip: RoundTrip,
) -> None:
    """sgd's parts, momentum and a schedule, in a tuple, copied together (no chain needed)."""
    parts = (
        samfunc.add_decayed_weights(1e-2),
        samfunc.trace(0.9, nesterov=True),
        samfunc.scale_by_learning_rate(warmup_cosine()),
    )
    copied = round_trip(parts)
    assert_trees_equal(run_in_sequence(parts), run_in_sequence(copied))
    sgd = samfunc.sgd(warmup_cosine(), momentum=0.9, nesterov=True, weight_decay=1e-2)
    assert_trees_equal(run(sgd)[-1], run_in_sequence(copied)[-1])


@pytest.mark.parametrize(
    "round_trip",
    [
        pytest.param(pickled, id="pickle"),
        pytest.param(deep_copied, id="deepcopy"),
        pytest.param(torch_saved, id="torch.save"),
    ],
)
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_alias_copy_runs_bitwise_like_the_original(name: str, round_trip: RoundTrip) -> None:
    original = ALIASES[name]()
    copied = round_trip(original)
    assert_trees_equal(run(original), run(copied))


@ROUND_TRIPS
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_copy_gives_the_same_values_and_range(name: str, round_trip: RoundTrip) -> None:
    original: Any = SCHEDULES[name]()  # Any: a schedule takes Python ints too
    copied = round_trip(original)
    assert schedule_range(original) is not None
    assert schedule_range(copied) == schedule_range(original)
    for count in range(21):
        expected = original(torch.tensor(count))
        actual = copied(torch.tensor(count))
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected), count
        assert torch.equal(copied(count), original(count)), count


@ROUND_TRIPS
def test_range_checks_still_run_on_a_copied_schedule(round_trip: RoundTrip) -> None:
    negative = round_trip(samfunc.linear_schedule(0.1, -0.1, transition_steps=10))
    with pytest.raises(ValueError, match="learning_rate schedule goes below 0"):
        samfunc.scale_by_learning_rate(negative)


@ROUND_TRIPS
def test_dynamic_loss_scale_copy_runs_bitwise(round_trip: RoundTrip) -> None:
    original = samfunc.dynamic_loss_scale(init_scale=2.0**10, growth_interval=2)
    copied = round_trip(original)
    assert isinstance(copied, samfunc.DynamicLossScale)
    finite = [True, True, False, True, True, True, False, True]
    states = []
    for loss_scale in (original, copied):
        state = loss_scale.init()
        trajectory = [state]
        for flag in finite:
            state = loss_scale.update(state, torch.tensor(flag))
            trajectory.append(state)
        states.append(trajectory)
    assert_trees_equal(states[0], states[1])
    assert float(states[1][2].scale) == 2.0**11


def weights_only_round_trip(state: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(expected: Any, actual: Any) -> None:
    """Same NamedTuple types all the way down, and bitwise equal tensors."""
    assert _tree.flatten(actual)[1] == _tree.flatten(expected)[1]
    assert_trees_equal(expected, actual)


@pytest.mark.parametrize("name", sorted(TRANSFORMS) + sorted(ALIASES))
def test_optimizer_states_load_with_weights_only(name: str) -> None:
    opt = {**TRANSFORMS, **ALIASES}[name]()
    trajectory = run(opt, steps=3)
    for state in [trajectory[0]] + [state for _, state, _ in trajectory[1:]]:
        assert_same_state(state, weights_only_round_trip(state))


def test_loss_scale_state_loads_with_weights_only() -> None:
    loss_scale = samfunc.dynamic_loss_scale(init_scale=8.0, growth_interval=1)
    state = loss_scale.update(loss_scale.init(), torch.tensor(True))
    loaded = weights_only_round_trip(state)
    assert type(loaded) is samfunc.LossScaleState
    assert_same_state(state, loaded)


def test_the_states_of_these_modules_are_on_torchs_allow_list() -> None:
    """weights_only=True loads them only because importing samfunc allow-lists them."""
    allowed = set(torch.serialization.get_safe_globals())
    for state_type in (
        samfunc.EmptyState,
        samfunc.ScaleByScheduleState,
        samfunc.ScaleByLearningRateState,
        samfunc.TraceState,
        samfunc.ScaleByAdamState,
        samfunc.DecoupledWeightDecayState,
        samfunc.LossScaleState,
    ):
        assert state_type in allowed, state_type.__name__


def test_a_method_pickled_before_the_interpreter_record_moved_still_loads() -> None:
    """Interpreted lived in samfunc._engine; whole-object checkpoints name it there."""
    import pickle

    method = samfunc.gsam(0.1, alpha=0.2)
    old = pickle.dumps(method, protocol=0).replace(
        b"samfunc._interpreted\nInterpreted", b"samfunc._engine\nInterpreted"
    )
    assert b"samfunc._engine\nInterpreted" in old
    loaded = pickle.loads(old)
    params = {"w": torch.tensor([1.0, -2.0])}
    loss_fn = lambda p, b: ((p["w"] * b) ** 2).sum()  # noqa: E731
    expected = method.grad(loss_fn, params, torch.ones(2), method.init(params))[0]
    got = loaded.grad(loss_fn, params, torch.ones(2), loaded.init(params))[0]
    assert torch.equal(expected["w"], got["w"])
