"""samfunc.SAM (the class), the functional path and the seed's algorithm agree."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc

from .seed_reference import SeedSAM, seed_disable_running_stats, seed_enable_running_stats

F = torch.nn.functional
STEPS = 10
DTYPE = torch.float64


# --- models and data ----------------------------------------------------------------------------


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    )


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (3, 6, 6))}


def make(name: str) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, *shape, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (8,), generator=generator),
        )
        for _ in range(STEPS)
    ]
    return model, batches


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_close(
    expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], atol: float = 1e-12
) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-10, msg=key)


def run_seed(name: str, adaptive: bool, rho: float) -> dict[str, torch.Tensor]:
    """The seed's training loop (its train.py), with its BatchNorm helpers."""
    model, batches = make(name)
    opt = SeedSAM(
        model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9
    )
    tracked = {k: v.clone() for k, v in model.named_buffers() if "num_batches" in k}
    for x, y in batches:
        seed_enable_running_stats(model)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        seed_disable_running_stats(model)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        for key in tracked:  # the seed counts the second pass too; count one pass per step
            tracked[key] += 1
    seed_enable_running_stats(model)
    state = state_of(model)
    state.update(tracked)
    return state


def run_class(name: str, adaptive: bool, rho: float, closure_form: bool) -> dict[str, torch.Tensor]:
    model, batches = make(name)
    opt = samfunc.SAM(
        model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9
    )
    for x, y in batches:
        if closure_form:

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            F.cross_entropy(model(x), y).backward()

            def perturbed_closure() -> torch.Tensor:
                with samfunc.frozen_running_stats(model):
                    return closure()

            opt.step(perturbed_closure)
            opt.zero_grad()
        else:
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            with samfunc.frozen_running_stats(model):
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    return state_of(model)


def run_functional(name: str, adaptive: bool, rho: float) -> dict[str, torch.Tensor]:
    model, batches = make(name)
    params, buffers = samfunc.module_state(model)
    opt = samfunc.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    for batch in batches:
        loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
        grads, (_, aux) = samfunc.sam_grad(
            loss_fn, params, batch, rho=rho, adaptive=adaptive, has_aux=True
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        params, buffers = samfunc.apply_updates(params, updates), aux.buffers
    return {**params, **buffers}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("adaptive", [False, True])
def test_class_functional_and_seed_give_the_same_run(name: str, adaptive: bool) -> None:
    rho = 0.5 if adaptive else 0.05
    expected = run_seed(name, adaptive, rho)
    assert_states_close(expected, run_class(name, adaptive, rho, closure_form=False))
    assert_states_close(expected, run_class(name, adaptive, rho, closure_form=True))
    assert_states_close(expected, run_functional(name, adaptive, rho))


def test_rho_zero_reproduces_the_base_optimizer_bitwise() -> None:
    model, batches = make("cnn")
    reference = copy.deepcopy(model)
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with samfunc.frozen_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        F.cross_entropy(reference(x), y).backward()
        base.step()
        base.zero_grad()
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


def test_per_group_rho_zero_leaves_that_group_unperturbed() -> None:
    model, batches = make("mlp")
    groups = [
        {"params": model[0].parameters(), "rho": 0.0},
        {"params": model[2].parameters(), "rho": 0.5, "adaptive": True},
    ]
    opt = samfunc.SAM(groups, torch.optim.SGD, lr=0.1)
    x, y = batches[0]
    before = state_of(model)
    F.cross_entropy(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}  # type: ignore[union-attr]
    opt.first_step()
    moved = state_of(model)
    assert torch.equal(moved["0.weight"], before["0.weight"])
    assert torch.equal(moved["0.bias"], before["0.bias"])
    # The norm is global over every group, as in the seed.
    norm = torch.sqrt(
        sum(((p.abs() if "2." in k else 1.0) * grads[k]).pow(2).sum() for k, p in before.items())  # type: ignore[misc]
    )
    expected = before["2.weight"] + 0.5 * before["2.weight"] ** 2 * grads["2.weight"] / norm
    torch.testing.assert_close(moved["2.weight"], expected)
    opt.second_step()


def test_a_parameter_without_a_second_gradient_is_still_restored() -> None:
    """The seed leaves such a parameter at w + e; samfunc puts it back to w."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    v = torch.nn.Parameter(torch.tensor([3.0]))
    opt = samfunc.SAM([w, v], torch.optim.SGD, rho=0.1, lr=0.0)
    (w.sum() + v.sum()).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(v.detach(), torch.tensor([3.0]))
    w.sum().backward()  # v gets no gradient in the second pass
    opt.second_step()
    assert torch.equal(v.detach(), torch.tensor([3.0]))
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))


def test_a_failing_closure_leaves_the_parameters_at_w() -> None:
    model, batches = make("mlp")
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches[0]
    before = state_of(model)

    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        raise RuntimeError("out of memory in the second pass")

    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(closure)
    assert_states_close(before, state_of(model), atol=0)
    assert not opt.base_optimizer.state  # the base optimizer did not step


def test_step_with_only_a_closure_is_a_whole_step_and_returns_the_loss_at_w() -> None:
    model, batches = make("mlp")
    twin = copy.deepcopy(model)
    x, y = batches[0]
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(F.cross_entropy(twin(x), y).item())
    reference = SeedSAM(twin.parameters(), torch.optim.SGD, lr=0.1)
    F.cross_entropy(twin(x), y).backward()
    reference.first_step(zero_grad=True)
    F.cross_entropy(twin(x), y).backward()
    reference.second_step()
    assert_states_close(state_of(twin), state_of(model))


def test_lr_scheduler_on_sam_changes_the_base_optimizer() -> None:
    model, _ = make("mlp")
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.first_step()
        opt.second_step(zero_grad=True)
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.param_groups is opt.base_optimizer.param_groups


def run_with_checkpoint(stop_at: int | None) -> dict[str, torch.Tensor]:
    model, batches = make("cnn")
    opt = samfunc.SAM(
        model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    for i, (x, y) in enumerate(batches):
        if i == stop_at:
            buffer = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": scheduler.state_dict(),
                },
                buffer,
            )
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=False)
            model, _ = make("cnn")
            opt = samfunc.SAM(
                model.parameters(),
                torch.optim.SGD,
                rho=0.1,
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
            )
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            scheduler.load_state_dict(saved["sched"])
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with samfunc.frozen_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        scheduler.step()
    assert opt.param_groups is opt.base_optimizer.param_groups
    return state_of(model)


def test_resumed_class_run_is_bitwise_identical() -> None:
    straight = run_with_checkpoint(None)
    resumed = run_with_checkpoint(STEPS // 2)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_state_dict_carries_the_base_optimizer_state() -> None:
    model, batches = make("mlp")
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    state = opt.state_dict()
    assert "momentum_buffer" in state["base_optimizer"]["state"][0]
    assert state["param_groups"][0]["rho"] == 0.05


def test_bad_arguments_name_themselves() -> None:
    params = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match=r"rho must be >= 0, got -0\.1"):
        samfunc.SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['rho'\] must be >= 0, got -1"):
        samfunc.SAM(
            [{"params": params}, {"params": [torch.nn.Parameter(torch.ones(1))], "rho": -1}],
            torch.optim.SGD,
            lr=0.1,
        )
    with pytest.raises(TypeError, match="base_optimizer must be an optimizer class"):
        samfunc.SAM(params, 3, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SAM\.step needs a closure"):
        samfunc.SAM(params, torch.optim.SGD, lr=0.1).step()
    opt = samfunc.SAM(params, torch.optim.SGD, lr=0.1)
    params[0].grad = torch.ones(1)
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step called twice"):
        opt.first_step()


@given(
    rho=st.floats(0.0, 1.0),
    adaptive=st.booleans(),
    eta=st.sampled_from([0.0, 0.01]),
    seed=st.integers(0, 100),
)
def test_first_step_moves_by_the_functional_perturbation(
    rho: float, adaptive: bool, eta: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.nn.Parameter(torch.randn(3, 2, generator=generator)),
        torch.nn.Parameter(torch.randn(4, generator=generator)),
    ]
    grads = [torch.randn(t.shape, generator=generator) for t in tensors]
    start = [t.detach().clone() for t in tensors]
    opt = samfunc.SAM(tensors, torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=0.1)
    for t, g in zip(tensors, grads):
        t.grad = g
    opt.first_step()
    e = samfunc.perturbation(start, grads, rho, adaptive=adaptive, eta=eta)
    for t, w, ei in zip(tensors, start, e):
        torch.testing.assert_close(t.detach(), w + ei)
    opt.second_step()
    for t, w in zip(tensors, start):
        torch.testing.assert_close(t.detach(), w - 0.1 * t.grad)  # type: ignore[operator]


def test_frozen_running_stats_keeps_every_batchnorm_statistic() -> None:
    model, batches = make("cnn")
    model(batches[0][0])
    before = {k: v.clone() for k, v in model.named_buffers()}
    with samfunc.frozen_running_stats(model):
        model(batches[1][0])
    for key, value in model.named_buffers():
        assert torch.equal(value, before[key]), key
    assert model[1].momentum == 0.1


def test_documented_ddp_pattern_runs_and_matches_single_process(tmp_path: Path) -> None:
    """The README's DistributedDataParallel pattern, in a one-process gloo group."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model, batches = make("cnn")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = samfunc.SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        for x, y in batches:
            with ddp.no_sync():
                F.cross_entropy(ddp(x), y).backward()
            opt.first_step(zero_grad=True)
            with samfunc.frozen_running_stats(ddp):
                F.cross_entropy(ddp(x), y).backward()
            opt.second_step(zero_grad=True)
        state = {k.removeprefix("module."): v.detach().clone() for k, v in ddp.state_dict().items()}
    finally:
        dist.destroy_process_group()
    assert_states_close(run_class("cnn", adaptive=False, rho=0.05, closure_form=False), state)
