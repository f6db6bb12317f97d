"""The train-step builders, eager; test_compile.py compiles one of them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import samfunc

from .helpers import assert_trees_close, assert_trees_equal
from .test_optim import STEPS, assert_states_close, make, run_seed

F = torch.nn.functional


@pytest.mark.parametrize("adaptive", [False, True])
def test_module_train_step_reproduces_the_seed(adaptive: bool) -> None:
    rho = 0.5 if adaptive else 0.05
    model, batches = make("cnn")
    opt = samfunc.sgd(0.1, momentum=0.9)
    step = samfunc.make_module_train_step(model, F.cross_entropy, opt, rho=rho, adaptive=adaptive)
    state = samfunc.init_train_state(model, opt)
    for batch in batches:
        state, metrics = step(state, batch)
        assert metrics.output.shape == (8, 3)
    assert int(state.step) == STEPS
    assert_states_close(run_seed("cnn", adaptive, rho), {**state.params, **state.buffers})


def test_plain_step_equals_torch_optim_sgd() -> None:
    model, batches = make("mlp")
    opt = samfunc.sgd(0.1, momentum=0.9, weight_decay=5e-4)
    step = samfunc.make_module_train_step(model, F.cross_entropy, opt, sam=False)
    state = samfunc.init_train_state(model, opt)
    reference = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in batches:
        state, metrics = step(state, (x, y))
        loss = F.cross_entropy(model(x), y)
        assert metrics.loss.item() == pytest.approx(loss.item(), rel=1e-12)
        reference.zero_grad()
        loss.backward()
        reference.step()
    assert_trees_close(dict(model.named_parameters()), state.params, atol=1e-12, rtol=1e-10)


def test_rho_schedule_is_evaluated_at_the_step_count() -> None:
    params = {"w": torch.tensor([1.0, -2.0])}
    opt = samfunc.sgd(0.01)
    schedule = samfunc.linear_schedule(0.0, 0.4, transition_steps=4)
    step = samfunc.make_train_step(lambda p, b: (p["w"] ** 2 * b).sum(), opt, rho=schedule)
    state = samfunc.init_train_state(params, opt)
    seen = []
    for _ in range(6):
        state, metrics = step(state, torch.ones(2))
        seen.append(metrics.rho.item())
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


@pytest.mark.parametrize("module", [False, True], ids=["make_train_step", "make_module_train_step"])
def test_metrics_report_the_learning_rate_and_rho_of_each_step(module: bool) -> None:
    """Both schedules read the clock; a skipped step shows the last applied update's values."""
    lr = samfunc.linear_schedule(0.1, 0.0, transition_steps=10)
    rho = samfunc.linear_schedule(0.0, 0.4, transition_steps=4)
    opt = samfunc.sgd(lr, momentum=0.9)
    model = torch.nn.Linear(2, 1)
    if module:
        step = samfunc.make_module_train_step(model, torch.nn.functional.mse_loss, opt, rho=rho)
        state = samfunc.init_train_state(model, opt)
        batch = (torch.ones(4, 2), torch.zeros(4, 1))
        bad = (torch.full((4, 2), float("nan")), torch.zeros(4, 1))
    else:
        step = samfunc.make_train_step(lambda p, b: (p["w"] ** 2 * b).sum(), opt, rho=rho)
        state = samfunc.init_train_state({"w": torch.tensor([1.0, -2.0])}, opt)
        batch, bad = torch.ones(2), torch.full((2,), float("nan"))
    seen = []
    for t in range(6):
        state, metrics = step(state, bad if t == 3 else batch)
        seen.append((metrics.learning_rate.item(), metrics.rho.item(), bool(metrics.finite)))
    assert [s[0] for s in seen] == pytest.approx([0.1, 0.09, 0.08, 0.08, 0.07, 0.06])
    assert [s[1] for s in seen][:3] == pytest.approx([0.0, 0.1, 0.2])
    assert [s[1] for s in seen][4:] == pytest.approx([0.3, 0.4])
    assert [s[2] for s in seen] == [True, True, True, False, True, True]
    assert int(state.step) == 5


def test_metrics_report_the_loss_at_w_and_the_norm_of_the_sam_gradient() -> None:
    params = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return 0.5 * (p["w"] ** 2).sum()

    opt = samfunc.sgd(0.0)
    _, metrics = samfunc.make_train_step(loss_fn, opt, rho=0.5)(
        samfunc.init_train_state(params, opt), None
    )
    assert metrics.loss.item() == pytest.approx(12.5)
    # grad = w; e = 0.5 * w / 5; SAM grad = w + e = 1.1 w, of norm 5.5.
    assert metrics.grad_norm.item() == pytest.approx(5.5)


def test_accumulation_in_a_module_step_merges_buffers_and_outputs() -> None:
    model, batches = make("cnn")
    opt = samfunc.sgd(0.1)
    full = samfunc.make_module_train_step(model, F.cross_entropy, opt)
    accumulated = samfunc.make_module_train_step(model, F.cross_entropy, opt, accum_steps=2)
    state = samfunc.init_train_state(model, opt)
    full_state, full_metrics = full(state, batches[0])
    acc_state, acc_metrics = accumulated(state, batches[0])
    assert acc_metrics.output.shape == full_metrics.output.shape == (8, 3)
    torch.testing.assert_close(
        acc_state.buffers["1.running_mean"], full_state.buffers["1.running_mean"]
    )
    assert acc_state.buffers["1.num_batches_tracked"].item() == 1


def test_builders_validate_their_arguments() -> None:
    opt = samfunc.sgd(0.1)
    with pytest.raises(ValueError, match="rho must be >= 0, got -1"):
        samfunc.make_train_step(lambda p, b: p, opt, rho=-1)
    with pytest.raises(ValueError, match="num_chunks and accum_steps cannot both be > 1"):
        samfunc.make_train_step(lambda p, b: p, opt, num_chunks=2, accum_steps=2)
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        samfunc.make_module_train_step(None, F.cross_entropy, opt)  # type: ignore[arg-type]


# --- dynamic loss scaling in the train steps ----------------------------------------------------


def _scaled_module_run(loss_scale: Any, **options: Any) -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    opt = samfunc.sgd(0.1, momentum=0.9)
    step = samfunc.make_module_train_step(
        model, F.cross_entropy, opt, loss_scale=loss_scale, **options
    )
    state = samfunc.init_train_state(model, opt, loss_scale=loss_scale)
    generator = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(6):
        batch = (
            torch.randn(8, 4, generator=generator),
            torch.randint(0, 3, (8,), generator=generator),
        )
        state, metrics = step(state, batch)
        losses.append(metrics.loss)
    return state, torch.stack(losses)


@pytest.mark.parametrize(
    "options",
    [{}, {"norm": "none", "rho": 0.01}, {"accum_steps": 2}, {"sam": False}],
    ids=["l2", "norm-none", "accum", "plain"],
)
def test_loss_scaled_step_equals_the_unscaled_step(options: dict[str, Any]) -> None:
    """A power-of-two scale without overflow is exact: the run is the unscaled one, bitwise.
    Scaling a pass twice or not unscaling would change it (norm="none" would climb S times
    too far without the radius adjustment)."""
    expected, expected_losses = _scaled_module_run(None, **options)
    scaler = samfunc.dynamic_loss_scale(init_scale=2.0**10, growth_interval=2)
    actual, losses = _scaled_module_run(scaler, **options)
    assert_trees_equal(expected.params, actual.params)
    assert_trees_equal(expected.buffers, actual.buffers)
    assert torch.equal(expected_losses, losses)
    assert float(actual.loss_scale.scale) == 2.0**13  # grew every 2 finite steps


def test_loss_scaled_step_skips_an_overflow_and_backs_off() -> None:
    params = {"w": torch.tensor([1.0, -2.0])}
    opt = samfunc.sgd(0.1)
    scaler = samfunc.dynamic_loss_scale(init_scale=2.0**8)

    def loss_fn(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return ((p["w"] * batch) ** 2).sum()

    step = samfunc.make_train_step(loss_fn, opt, loss_scale=scaler)
    state = samfunc.init_train_state(params, opt, loss_scale=scaler)
    state, metrics = step(state, torch.tensor([1.0, float("inf")]))
    assert not bool(metrics.finite)
    assert torch.equal(state.params["w"], params["w"])
    assert float(state.loss_scale.scale) == 2.0**7
    state, metrics = step(state, torch.ones(2))
    assert bool(metrics.finite) and not torch.equal(state.params["w"], params["w"])


def test_float16_autocast_with_loss_scaling_trains() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = torch.func.functional_call(model, p, (batch[0],))
        return F.cross_entropy(logits.float(), batch[1])

    opt = samfunc.sgd(0.1, momentum=0.9)
    scaler = samfunc.dynamic_loss_scale()
    step = samfunc.make_train_step(loss_fn, opt, loss_scale=scaler)
    state = samfunc.init_train_state(samfunc.module_params(model), opt, loss_scale=scaler)
    losses = []
    for _ in range(15):
        state, metrics = step(state, (x, y))
        losses.append(float(metrics.loss))
    assert all(p.dtype == torch.float32 for p in state.params.values())
    assert losses[-1] < 0.9 * losses[0]


def test_loss_scale_options_are_checked_when_built() -> None:
    opt = samfunc.sgd(0.1)
    loss_fn = lambda p, b: p["w"].sum()  # noqa: E731
    with pytest.raises(ValueError, match="needs nonfinite='skip'"):
        samfunc.make_train_step(
            loss_fn, opt, loss_scale=samfunc.dynamic_loss_scale(), nonfinite="raise"
        )
    with pytest.raises(TypeError, match="dynamic_loss_scale"):
        samfunc.make_train_step(loss_fn, opt, loss_scale=2.0**16)  # type: ignore[arg-type]
    step = samfunc.make_train_step(loss_fn, opt, loss_scale=samfunc.dynamic_loss_scale())
    with pytest.raises(ValueError, match=r"state\.loss_scale is empty"):
        step(samfunc.init_train_state({"w": torch.ones(2)}, opt), None)


def test_metrics_report_the_steps_rho_and_rate_on_a_state_another_method_built() -> None:
    """init_train_state builds sam(0.05)'s state by default; a step of sam(0.2) reports 0.2."""
    params = {"w": torch.tensor([1.0, -2.0])}
    state = samfunc.init_train_state(params, samfunc.sgd(0.3))
    step = samfunc.make_train_step(
        lambda p, b: ((p["w"] * b) ** 2).sum(), samfunc.sgd(0.1), rho=0.2
    )
    for _ in range(2):
        state, metrics = step(state, torch.ones(2))
        assert metrics.rho.item() == pytest.approx(0.2)
        assert metrics.learning_rate.item() == pytest.approx(0.1)
