"""torch.compile(fullgraph=True) over whole SAM train steps equals eager.

Compiling costs 10-30 s on the CPU here, so compiled functions are few and shared.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo

import samfunc

from .helpers import max_abs_diff

F = torch.nn.functional
STEPS = 8


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 5),
    )


MODEL = cnn()
# Everything that changes from step to step is a tensor: lr and rho schedules, the count.
OPTIMIZER = samfunc.sgd(samfunc.cosine_decay_schedule(0.1, STEPS), momentum=0.9, weight_decay=5e-4)
STEP = samfunc.make_module_train_step(
    MODEL,
    F.cross_entropy,
    OPTIMIZER,
    rho=samfunc.linear_schedule(0.02, 0.1, transition_steps=STEPS),
    adaptive=lambda path, _: path.endswith("weight"),
    eta=0.01,
)


@pytest.fixture(scope="module")
def compiled_step() -> Any:
    torch._dynamo.reset()
    return torch.compile(STEP, fullgraph=True)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 3, 8, 8, generator=generator),
            torch.randint(0, 5, (16,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def test_compiled_module_step_equals_eager_without_recompiles(compiled_step: Any) -> None:
    eager = compiled = samfunc.init_train_state(MODEL, OPTIMIZER)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches():
            eager, eager_metrics = STEP(eager, batch)
            compiled, compiled_metrics = compiled_step(compiled, batch)
            assert compiled_metrics.loss.item() == pytest.approx(
                eager_metrics.loss.item(), abs=1e-5
            )
            assert compiled_metrics.rho.item() == pytest.approx(eager_metrics.rho.item())
    assert int(compiled.step) == STEPS
    assert max_abs_diff(eager.params, compiled.params) <= 1e-5
    assert max_abs_diff(eager.buffers, compiled.buffers) <= 1e-5
    assert max_abs_diff(eager.opt_state, compiled.opt_state) <= 1e-5


def test_compiled_sam_grad_with_accumulation_equals_eager() -> None:
    """sam_grad, an optimizer update and apply_updates, written by hand, compiled."""
    params = samfunc.module_params(MODEL)
    opt = samfunc.adamw(1e-3)

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        MODEL.eval()  # a loss without buffer updates: eval-mode BatchNorm
        return F.cross_entropy(torch.func.functional_call(MODEL, p, (x,)), y)

    def train_step(p: Any, opt_state: Any, batch: Any, rho: torch.Tensor) -> Any:
        grads, loss = samfunc.sam_grad(loss_fn, p, batch, rho=rho, accum_steps=2)
        updates, opt_state = opt.update(grads, opt_state, p)
        return samfunc.apply_updates(p, updates), opt_state, loss

    compiled_fn = torch.compile(train_step, fullgraph=True)
    eager = compiled = (params, opt.init(params))
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i, batch in enumerate(batches()[:4]):
                rho = torch.tensor(0.05 + 0.01 * i)
                *eager, _ = train_step(*eager, batch, rho)
                *compiled, _ = compiled_fn(*compiled, batch, rho)
    finally:
        MODEL.train()
    assert max_abs_diff(eager[0], compiled[0]) <= 1e-5


def test_steps_built_with_different_float_rhos_compile() -> None:
    """Dynamo turns a float that changed between compilations of one code object into a
    symbolic float; validation and the perturbation must still trace (the demo's --compile)."""
    opt = samfunc.sgd(0.1)

    def loss_fn(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return ((p["w"] * batch) ** 2).sum()

    params = {"w": torch.tensor([1.0, -2.0])}
    for rho in (0.1, 0.2, 0.3):
        step = samfunc.make_train_step(loss_fn, opt, rho=rho)
        state = samfunc.init_train_state(params, opt)
        compiled_state, compiled_metrics = torch.compile(step, fullgraph=True)(state, torch.ones(2))
        eager_state, _ = step(state, torch.ones(2))
        assert compiled_metrics.rho.item() == pytest.approx(rho)
        assert max_abs_diff(eager_state.params, compiled_state.params) <= 1e-6


def test_compiled_step_skips_a_nonfinite_batch_without_recompiling(compiled_step: Any) -> None:
    """nonfinite="skip" (the default) is torch.where in the graph: no branch, no recompile."""
    state = samfunc.init_train_state(MODEL, OPTIMIZER)
    good, *_ = batches()
    bad = (good[0].clone(), good[1])
    bad[0][0, 0, 0, 0] = float("nan")
    with torch._dynamo.config.patch(error_on_recompile=True):
        state, metrics = compiled_step(state, good)
        assert bool(metrics.finite)
        before = state
        state, metrics = compiled_step(state, bad)
        assert not bool(metrics.finite)
        state_after_good, _ = compiled_step(state, good)
    assert max_abs_diff(before.params, state.params) == 0.0
    assert max_abs_diff(before.buffers, state.buffers) == 0.0
    assert max_abs_diff(before.opt_state, state.opt_state) == 0.0
    assert int(state_after_good.step) == 2  # the skipped step is no update


def test_bad_rho_inside_a_compiled_function() -> None:
    """A negative float rho still names itself; a bad tensor rho becomes NaN, never a descent."""

    def loss_fn(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return ((p["w"] * batch) ** 2).sum()

    def grads_at(rho: Any) -> Any:
        return samfunc.sam_grad(loss_fn, {"w": torch.tensor([1.0, -2.0])}, torch.ones(2), rho=rho)[
            0
        ]

    compiled = torch.compile(grads_at, fullgraph=True)
    with pytest.raises(Exception, match="rho must be >= 0"):
        compiled(-0.5)
    assert compiled(torch.tensor(-0.5))["w"].isnan().all()
    assert compiled(torch.tensor(float("inf")))["w"].isnan().all()
    assert torch.isfinite(compiled(torch.tensor(0.05))["w"]).all()


def test_a_partial_last_batch_marked_dynamic_runs_in_the_same_graph() -> None:
    """The functional guide's advice: mark_dynamic on the batch dimension, one graph for 8 and 5."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )
    opt = samfunc.sgd(0.1, momentum=0.9)
    step = samfunc.make_module_train_step(model, F.cross_entropy, opt)
    dataset = torch.utils.data.TensorDataset(torch.randn(13, 4), torch.randint(0, 3, (13,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)  # batches of 8 and 5
    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True)
    eager = compiled = samfunc.init_train_state(model, opt)
    sizes = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            for x, y in loader:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(y, 0)
                compiled, _ = compiled_step(compiled, (x, y))
                eager, _ = step(eager, (x, y))
                sizes.append(x.shape[0])
    assert sizes == [8, 5, 8, 5]
    assert max_abs_diff(eager.params, compiled.params) <= 1e-5
