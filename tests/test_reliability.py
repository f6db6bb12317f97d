"""The functional API's silent failures, each pinned down: key order, bad rho, NaN, flags,
undetached params, unloadable states, integer losses, foreign states, threads."""

from __future__ import annotations

import io
import sys
import threading
from typing import Any

import pytest
import torch

import samfunc

from .helpers import assert_trees_equal, clone_tree

F = torch.nn.functional


def quadratic(params: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    return ((params["w"] * batch).pow(2).sum() + params["b"].pow(2).sum()) / 2


def make_params() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.3])}


# --- item 2: leaves are paired by key, never by position ------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [
        samfunc.sgd(0.1, momentum=0.9),
        samfunc.adam(1e-3),
        samfunc.adamw(1e-3),
    ],
    ids=["sgd-momentum", "adam", "adamw"],
)
def test_update_with_keys_in_another_order_raises(optimizer: Any) -> None:
    params = {"w": torch.ones(3, 2), "b": torch.ones(2)}
    state = optimizer.init(params)
    reordered = {"b": params["b"], "w": params["w"]}
    grads = {"b": torch.ones(2), "w": torch.ones(3, 2)}
    with pytest.raises(ValueError, match="keys in different order"):
        optimizer.update(grads, state, reordered)


def test_weight_decay_with_params_in_another_order_than_grads_raises() -> None:
    opt = samfunc.sgd(0.1, weight_decay=0.1)
    params = {"w": torch.ones(3, 2), "b": torch.ones(2)}
    grads = {"b": torch.ones(2), "w": torch.ones(3, 2)}
    with pytest.raises(ValueError, match="keys in different order"):
        opt.update(grads, opt.init(params), params)


def test_update_with_another_models_state_raises() -> None:
    opt = samfunc.sgd(0.1, momentum=0.9)
    state = opt.init({"w": torch.ones(3, 2), "b": torch.ones(2)})
    grads = {"w": torch.ones(3, 2), "b": torch.ones(3, 2)}  # a bias as big as a matrix
    with pytest.raises(
        ValueError, match=r"updates must have the shapes of the optimizer state; at b"
    ):
        opt.update(grads, state)


def test_apply_updates_never_broadcasts() -> None:
    with pytest.raises(ValueError, match=r"at b: \(3, 2\) vs \(2,\)"):
        samfunc.apply_updates({"b": torch.ones(2)}, {"b": torch.ones(3, 2)})


def test_an_adam_state_given_to_sgd_raises() -> None:
    params = {"w": torch.ones(2)}
    adam_state = samfunc.adam(1e-3).init(params)
    with pytest.raises(
        TypeError, match="trace \\(momentum\\) got a state of type ScaleByAdamState"
    ):
        samfunc.sgd(0.1, momentum=0.9).update({"w": torch.ones(2)}, adam_state, params)
    with pytest.raises(ValueError, match="state has 3 entries but the chain has 2"):
        samfunc.adam(1e-3).update({"w": torch.ones(2)}, samfunc.adamw(1e-3).init(params), params)


# --- item 3: a bad rho, float or tensor, eager or compiled --------------------------------------


@pytest.mark.parametrize(
    "rho", [torch.tensor(-0.5), torch.tensor(float("nan")), torch.tensor(float("inf"))]
)
def test_a_bad_tensor_rho_raises_in_eager_mode(rho: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="rho must be"):
        samfunc.sam_grad(quadratic, make_params(), torch.ones(3), rho=rho)
    with pytest.raises(ValueError, match="rho must be"):
        samfunc.sam_grad_and_value(quadratic)(make_params(), torch.ones(3), rho)


def test_a_tensor_rho_is_checked_when_built_and_guarded_at_every_step() -> None:
    """Refused when the step is built (before any compile); NaN if changed in place later."""
    opt = samfunc.sgd(0.1)
    with pytest.raises(ValueError, match="rho must be >= 0"):
        samfunc.make_train_step(quadratic, opt, rho=torch.tensor(-0.5))
    with pytest.raises(ValueError, match="rho must be >= 0"):
        samfunc.sam(rho=torch.tensor(-0.5))
    rho = torch.tensor(0.05)
    method = samfunc.sam(rho=rho)
    params = make_params()
    assert torch.isfinite(
        method.grad(quadratic, params, torch.ones(3), method.init(params))[0]["w"]
    ).all()
    rho.fill_(-0.5)  # a schedule of one's own that went wrong
    grads = method.grad(quadratic, params, torch.ones(3), method.init(params))[0]
    assert all(g.isnan().all() for g in grads.values())


def test_guard_turns_a_bad_radius_into_nan_so_it_cannot_descend() -> None:
    """What a compiled step or a device tensor gets instead of a device sync."""
    from samfunc._validate import guard_radius

    values = torch.tensor([-0.5, float("nan"), float("inf"), 0.0, 0.05])
    guarded = torch.stack([guard_radius(v) for v in values])
    assert guarded[:3].isnan().all()
    assert torch.equal(guarded[3:], values[3:])


@pytest.mark.parametrize(
    "schedule",
    [
        samfunc.linear_schedule(0.1, -0.1, transition_steps=10),
        samfunc.cosine_decay_schedule(-0.1, decay_steps=10),
        samfunc.join_schedules(
            [samfunc.constant_schedule(0.1), samfunc.constant_schedule(-1.0)], [5]
        ),
    ],
    ids=["linear", "cosine", "join"],
)
def test_a_schedule_that_goes_negative_is_rejected_when_built(schedule: Any) -> None:
    with pytest.raises(ValueError, match="rho schedule goes below 0"):
        samfunc.make_train_step(quadratic, samfunc.sgd(0.1), rho=schedule)
    with pytest.raises(ValueError, match="learning_rate schedule goes below 0"):
        samfunc.sgd(schedule)
    with pytest.raises(ValueError, match="learning_rate schedule goes below 0"):
        samfunc.adamw(schedule)


def test_a_user_rho_schedule_that_goes_negative_skips_the_step() -> None:
    """An arbitrary callable cannot be checked when built: the step catches it when run."""
    opt = samfunc.sgd(0.1, momentum=0.9)
    step = samfunc.make_train_step(quadratic, opt, rho=lambda count: 0.1 - 0.2 * count)
    floats = samfunc.make_train_step(quadratic, opt, rho=lambda count: 0.1)  # a float, not a tensor
    assert bool(floats(samfunc.init_train_state(make_params(), opt), torch.ones(3))[1].finite)
    state = samfunc.init_train_state(make_params(), opt)
    state, metrics = step(state, torch.ones(3))  # rho 0.1
    assert bool(metrics.finite)
    before = clone_tree(state)
    state, metrics = step(state, torch.ones(3))  # rho -0.1
    assert not bool(metrics.finite)
    assert_trees_equal(before.params, state.params)
    assert_trees_equal(before.opt_state, state.opt_state)
    # One clock: a skipped step is no update, so the schedule stays at count 1 and
    # every later step is skipped too, visibly (metrics.finite False), never applied.
    assert int(state.step) == 1 and int(state.method_state.steps) == 1
    state, metrics = step(state, torch.ones(3))
    assert not bool(metrics.finite) and int(state.step) == 1


# --- item 4: non-finite gradients ----------------------------------------------------------------


def nan_at_zero(params: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """Finite loss, NaN gradient in one element of one leaf: d sqrt(w^2)/dw at w = 0."""
    return torch.sqrt(params["w"] ** 2).sum() + params["b"].pow(2).sum() * batch.sum()


def test_one_nan_element_spreads_to_every_leaf_when_propagated() -> None:
    params = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.5])}
    grads, loss = samfunc.sam_grad(nan_at_zero, params, torch.ones(2))
    assert torch.isfinite(loss)
    assert grads["b"].isnan().all() and grads["w"].isnan().all()


def test_nonfinite_raise_names_the_pass_and_the_leaf() -> None:
    params = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.5])}
    with pytest.raises(samfunc.NonFiniteGradientError, match=r"first pass, at w.*leaf 'w'"):
        samfunc.sam_grad(nan_at_zero, params, torch.ones(2), nonfinite="raise")
    with pytest.raises(samfunc.NonFiniteGradientError, match="first pass"):
        samfunc.sam_grad(nan_at_zero, params, torch.ones(2), nonfinite="raise", accum_steps=2)

    def nan_when_moved(p: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        moved = (p["b"] != make_params()["b"]).any()
        return quadratic(p, batch) * torch.where(moved, float("nan"), 1.0)

    with pytest.raises(samfunc.NonFiniteGradientError, match=r"second pass, at w \+ e"):
        samfunc.sam_grad(nan_when_moved, make_params(), torch.ones(3), nonfinite="raise")


@pytest.mark.parametrize("sam", [True, False])
def test_train_step_skips_a_nonfinite_step_and_goes_on(sam: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = samfunc.sgd(0.1, momentum=0.9)
    step = samfunc.make_module_train_step(model, F.mse_loss, opt, sam=sam)
    state = samfunc.init_train_state(model, opt)
    good = (torch.randn(8, 3), torch.randn(8, 4))
    bad = (good[0].clone(), good[1].clone())
    bad[0][0, 0] = float("nan")
    state, metrics = step(state, good)
    assert bool(metrics.finite)
    before = clone_tree(state)
    state, metrics = step(state, bad)
    assert not bool(metrics.finite)
    for name in ("params", "opt_state", "buffers"):
        assert_trees_equal(getattr(before, name), getattr(state, name))
    state, metrics = step(state, good)
    assert bool(metrics.finite) and int(state.step) == 2  # the skipped step is no update


def test_train_step_nonfinite_raise_and_propagate() -> None:
    params = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.5])}
    opt = samfunc.sgd(0.1)
    state = samfunc.init_train_state(params, opt)
    raising = samfunc.make_train_step(nan_at_zero, opt, nonfinite="raise")
    with pytest.raises(samfunc.NonFiniteGradientError, match="first pass"):
        raising(state, torch.ones(2))
    plain = samfunc.make_train_step(nan_at_zero, opt, sam=False, nonfinite="raise")
    with pytest.raises(samfunc.NonFiniteGradientError, match="gradient pass"):
        plain(state, torch.ones(2))
    propagating = samfunc.make_train_step(nan_at_zero, opt, nonfinite="propagate")
    new_state, metrics = propagating(state, torch.ones(2))
    assert new_state.params["b"].isnan().all() and not bool(metrics.finite)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        samfunc.make_train_step(nan_at_zero, opt, nonfinite="ignore")  # type: ignore[arg-type]


def test_apply_if_finite_keeps_params_and_state_on_a_bad_step() -> None:
    opt = samfunc.apply_if_finite(samfunc.sgd(0.1, momentum=0.9))
    params = make_params()
    state = opt.init(params)
    grads, _ = samfunc.sam_grad(quadratic, params, torch.ones(3))
    updates, state = opt.update(grads, state, params)
    params = samfunc.apply_updates(params, updates)
    before_params, before_state = clone_tree(params), clone_tree(state)
    bad = {"w": torch.tensor([float("nan"), 0.0, 0.0]), "b": torch.zeros(1)}
    updates, state = opt.update(bad, state, params)
    assert_trees_equal(before_params, samfunc.apply_updates(params, updates))
    assert_trees_equal(before_state.inner_state, state.inner_state)
    assert int(state.total_notfinite) == 1 and int(state.notfinite_count) == 1
    updates, state = opt.update(grads, state, params)
    assert int(state.notfinite_count) == 0 and bool(state.last_finite)


# --- item 5: flags are bools, in every entry point ----------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: samfunc.sam_grad(quadratic, make_params(), torch.ones(3), adaptive="False"),
            "adaptive",
        ),
        (
            lambda: samfunc.sam_grad(quadratic, make_params(), torch.ones(3), reuse_rng="no"),
            "reuse_rng",
        ),
        (lambda: samfunc.sam_grad(quadratic, make_params(), torch.ones(3), has_aux=0), "has_aux"),
        (
            lambda: samfunc.sam_grad(quadratic, make_params(), torch.ones(3), vectorize_chunks=1),
            "vectorize_chunks",
        ),
        (lambda: samfunc.make_train_step(quadratic, samfunc.sgd(0.1), sam="True"), "sam"),
        (lambda: samfunc.sgd(0.1, momentum=0.9, nesterov="False"), "nesterov"),
        (lambda: samfunc.trace(0.9, nesterov=1), "nesterov"),
        (lambda: samfunc.scale_by_learning_rate(0.1, flip_sign="yes"), "flip_sign"),
    ],
)
def test_flags_that_are_not_bools_are_rejected(call: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()


# --- item 6: undetached parameters ---------------------------------------------------------------


def test_named_parameters_without_detach_are_rejected_not_leaked() -> None:
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())

    def loss_fn(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (batch,)).pow(2).mean()

    with pytest.raises(ValueError, match=r"nn\.Parameter that requires grad at weight.*detach"):
        samfunc.sam_grad(loss_fn, params, torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"nn\.Parameter"):
        samfunc.apply_updates(params, {k: torch.zeros_like(v) for k, v in params.items()})
    with pytest.raises(ValueError, match=r"nn\.Parameter"):
        samfunc.init_train_state(params, samfunc.sgd(0.1))


def test_a_functional_loop_builds_no_graph_across_steps() -> None:
    """The documented way (module_params) keeps every step's output free of autograd history."""
    model = torch.nn.Linear(3, 2)
    params = samfunc.module_params(model)
    opt = samfunc.sgd(0.1, momentum=0.9)
    state = opt.init(params)

    def loss_fn(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (batch,)).pow(2).mean()

    for _ in range(5):
        grads, _ = samfunc.sam_grad(loss_fn, params, torch.ones(4, 3))
        updates, state = opt.update(grads, state, params)
        params = samfunc.apply_updates(params, updates)
    leaves = [*params.values(), *samfunc._tree.leaves(state)]
    assert all(leaf.grad_fn is None and not leaf.requires_grad for leaf in leaves)


# --- item 8: every state loads with plain torch.load ---------------------------------------------


def reload(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only=True, torch's default


@pytest.mark.parametrize(
    "optimizer",
    [
        samfunc.sgd(samfunc.cosine_decay_schedule(0.1, 10), momentum=0.9, weight_decay=1e-4),
        samfunc.adam(1e-3, weight_decay=1e-4),
        samfunc.adamw(samfunc.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10)),
        samfunc.chain(samfunc.clip_by_global_norm(1.0), samfunc.sgd(0.1)),
        samfunc.masked(samfunc.add_decayed_weights(0.1), lambda path, _: path == "w"),
        samfunc.apply_if_finite(samfunc.adam(1e-3)),
    ],
    ids=["sgd", "adam", "adamw", "clip", "masked", "apply_if_finite"],
)
def test_every_optimizer_state_loads_with_weights_only(optimizer: Any) -> None:
    params = make_params()
    state = optimizer.init(params)
    _, state = optimizer.update(make_params(), state, params)
    assert_trees_equal(state, reload(state))


def test_train_state_and_metrics_load_with_weights_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = samfunc.sgd(0.1, momentum=0.9)
    step = samfunc.make_module_train_step(model, F.mse_loss, opt)
    state, metrics = step(
        samfunc.init_train_state(model, opt), (torch.randn(8, 3), torch.randn(8, 4))
    )
    loaded_state, loaded_metrics = reload((state, metrics))
    assert type(loaded_state) is samfunc.TrainState and type(loaded_metrics) is samfunc.StepMetrics
    assert_trees_equal(state, loaded_state)
    resumed, _ = step(loaded_state, (torch.ones(8, 3), torch.ones(8, 4)))
    straight, _ = step(state, (torch.ones(8, 3), torch.ones(8, 4)))
    assert_trees_equal(straight, resumed)


# --- item 13: integer losses, sparse gradients, threads ------------------------------------------


def test_an_integer_loss_gets_a_clear_error() -> None:
    def argmax_loss(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return (p["w"] * batch).argmax()

    with pytest.raises(TypeError, match=r"floating-point loss, got torch\.int64"):
        samfunc.sam_grad(argmax_loss, make_params(), torch.ones(3))
    step = samfunc.make_train_step(argmax_loss, samfunc.sgd(0.1), sam=False)
    with pytest.raises(TypeError, match="floating-point loss"):
        step(samfunc.init_train_state(make_params(), samfunc.sgd(0.1)), torch.ones(3))


def test_sparse_gradients_get_a_clear_error() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)

    def loss_fn(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(embedding, p, (batch,)).sum()

    with pytest.raises(TypeError, match=r"dense gradients.*sparse=False"):
        samfunc.sam_grad(loss_fn, samfunc.module_params(embedding), torch.tensor([1, 2]))


CALLS = 200


def test_reuse_rng_is_thread_safe_among_samfunc_calls() -> None:
    """Each call's two passes see the same random draws, with two threads calling at once."""
    records: dict[int, list[torch.Tensor]] = {}
    heavy = torch.ones(200, 200)

    def noisy_loss(p: Any, batch: torch.Tensor) -> torch.Tensor:
        draw = torch.rand(16)  # a dropout mask, in effect
        records.setdefault(threading.get_ident(), []).append(draw)
        work = (heavy @ heavy).mean() * 0  # releases the GIL: the other thread runs here
        return (p["w"].sum() * draw.sum() + batch.sum() + work) ** 2

    def work() -> None:
        for _ in range(CALLS):
            samfunc.sam_grad(noisy_loss, {"w": torch.ones(3)}, torch.ones(2), reuse_rng=True)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(switch_interval)
    assert len(records) == 2
    for draws in records.values():
        assert len(draws) == 2 * CALLS
        assert all(torch.equal(a, b) for a, b in zip(draws[0::2], draws[1::2]))
