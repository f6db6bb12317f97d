"""The train-step builders, eager; test_compile.py compiles one of them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import samfunc

from .helpers import assert_trees_close
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
