"""samfunc.SAM inside PyTorch Lightning and Hugging Face Accelerate, as their users run them.

Each test trains a tiny MLP for a few steps through the framework and compares the
parameters with a SAM loop written from the paper (w + rho g / ||g||, the gradient
there, back to w, SGD with momentum), counting forward and backward passes; with
BatchNorm, dropout, self.log and torchmetrics, also what is logged and counted. The code
between ``# recipe:`` and ``# end recipe`` is each pattern's core; the README's
self-contained versions run in tests/test_readme_scaling.py.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import samfunc

F = torch.nn.functional
STEPS = 3
BATCH = 8
RHO, LR, MOMENTUM = 0.05, 0.1, 0.9
Batch = tuple[torch.Tensor, torch.Tensor]


def make_net(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(
        dtype
    )


def make_data(dtype: torch.dtype = torch.float64, batches: int = 2 * STEPS) -> Batch:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batches * BATCH, 4, generator=generator, dtype=dtype)
    return x, x[:, :1].sin() + 0.1 * torch.randn(
        batches * BATCH, 1, generator=generator, dtype=dtype
    )


def make_loader(data: Batch, batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=batch_size)


def hand_sam(
    data: Batch,
    steps: int = STEPS,
    dtype: torch.dtype = torch.float64,
    autocast: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """SAM from the paper, with SGD + momentum written out; optionally under CPU autocast."""
    net = make_net(dtype)
    params = list(net.parameters())
    velocity: list[torch.Tensor] = []
    x_all, y_all = data

    def grads_at(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        context = contextlib.nullcontext() if autocast is None else torch.autocast("cpu", autocast)
        with context:
            out = net(x)
        return torch.autograd.grad(F.mse_loss(out.to(dtype), y), params)

    for step in range(steps):
        x, y = x_all[step * BATCH : (step + 1) * BATCH], y_all[step * BATCH : (step + 1) * BATCH]
        g = grads_at(x, y)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        e = [RHO * gi / (norm + 1e-12) for gi in g]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        g_s = grads_at(x, y)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
            velocity = (
                list(g_s) if step == 0 else [MOMENTUM * v + gs for v, gs in zip(velocity, g_s)]
            )
            for p, v in zip(params, velocity):
                p.sub_(LR * v)
    return [p.detach() for p in params]


class Passes:
    """Counts forward passes through a module and backward passes into its first parameter."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.forward = self.backward = 0
        net.register_forward_hook(self._on_forward)
        next(net.parameters()).register_post_accumulate_grad_hook(self._on_backward)

    def _on_forward(self, *args: Any) -> None:
        self.forward += 1

    def _on_backward(self, *args: Any) -> None:
        self.backward += 1


def autocast_reference(
    data: Batch, autocast: torch.dtype = torch.bfloat16, steps: int = STEPS
) -> list[torch.Tensor]:
    """The hand loop under autocast, checked to be far from float32's (autocast matters)."""
    expected = hand_sam(data, steps, torch.float32, autocast)
    float32 = hand_sam(data, steps, torch.float32)
    assert max((a - b).abs().max().item() for a, b in zip(expected, float32)) > 1e-4
    return expected


def max_abs_difference(expected: list[torch.Tensor], net: torch.nn.Module) -> float:
    return max((e - p.detach()).abs().max().item() for e, p in zip(expected, net.parameters()))


def check(name: str, expected: list[torch.Tensor], net: torch.nn.Module, atol: float) -> None:
    difference = max_abs_difference(expected, net)
    print(f"{name}: max abs difference to the hand-written SAM loop {difference:.2e}")
    assert difference <= atol


# --- PyTorch Lightning ------------------------------------------------------------------------


@pytest.fixture
def lightning() -> Iterator[Any]:
    module = pytest.importorskip("pytorch_lightning")
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)  # no "GPU available: False" banners
    yield module
    logger.setLevel(level)


def make_trainer(lightning: Any, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return lightning.Trainer(**{**options, **kwargs})


def fit(model: Any, trainer: Any, loader: torch.utils.data.DataLoader) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|litlogger).*")
        trainer.fit(model, loader)


def automatic_module() -> type:
    # recipe: lightning-automatic
    import pytorch_lightning as pl

    class LitSAM(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return samfunc.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    # end recipe
    return LitSAM


@pytest.mark.parametrize("precision", ["64-true", "bf16-mixed"])
def test_lightning_automatic_optimization_is_sam(lightning: Any, precision: str) -> None:
    """configure_optimizers returns SAM; Lightning's closure runs twice per step."""
    dtype = torch.float64 if precision == "64-true" else torch.float32
    data = make_data(dtype)

    class Counted(automatic_module()):  # type: ignore[misc]
        calls = 0

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            self.calls += 1
            return super().training_step(batch, batch_idx)

    model = Counted(make_net(dtype))
    passes = Passes(model.net)
    trainer = make_trainer(lightning, precision=precision)
    fit(model, trainer, make_loader(data))
    print(f"lightning automatic {precision}: {model.calls} training_step calls, {STEPS} steps")
    assert (model.calls, passes.forward, passes.backward) == (2 * STEPS,) * 3
    assert trainer.global_step == STEPS
    bf16 = precision == "bf16-mixed"
    expected = autocast_reference(data) if bf16 else hand_sam(data)
    check(f"lightning automatic {precision}", expected, model.net, atol=1e-6 if bf16 else 1e-12)


def manual_module() -> type:
    # recipe: lightning-manual
    import pytorch_lightning as pl

    class LitSAM(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            optimizer = self.optimizers()

            def closure():
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(self.net(x), y)
                self.manual_backward(loss)
                return loss

            loss = optimizer.step(closure=closure)  # at w, then at w + e; counts a global step
            self.log("loss", loss)

        def configure_optimizers(self):
            return samfunc.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    # end recipe
    return LitSAM


def seed_pattern_module() -> type:
    class SeedPattern(manual_module()):  # type: ignore[misc]
        def training_step(self, batch: Batch, batch_idx: int) -> None:
            x, y = batch
            optimizer = self.optimizers()
            self.manual_backward(F.mse_loss(self.net(x), y))  # the first pass, at w

            def closure() -> torch.Tensor:
                loss = F.mse_loss(self.net(x), y)
                self.manual_backward(loss)
                return loss

            optimizer.step(closure=closure)  # sees the fresh gradients: one more pass, at w + e
            optimizer.zero_grad()

    return SeedPattern


def two_step_module() -> type:
    class TwoStep(manual_module()):  # type: ignore[misc]
        def training_step(self, batch: Batch, batch_idx: int) -> None:
            x, y = batch
            optimizer = self.optimizers()
            self.manual_backward(F.mse_loss(self.net(x), y))
            optimizer.first_step(zero_grad=True)
            self.manual_backward(F.mse_loss(self.net(x), y))
            optimizer.second_step(zero_grad=True)

    return TwoStep


def run_manual(
    lightning: Any, module: type, dtype: torch.dtype = torch.float64, **kwargs: Any
) -> tuple[Any, Any, Passes]:
    data = make_data(dtype)
    model = module(make_net(dtype))
    passes = Passes(model.net)
    # max_epochs=1 is a safety net: the loader holds 2 * STEPS batches, so a run that max_steps
    # does not end trains 2 * STEPS steps instead of hanging.
    trainer = make_trainer(lightning, max_epochs=1, **kwargs)
    fit(model, trainer, make_loader(data))
    return model, trainer, passes


@pytest.mark.parametrize("pattern", ["closure", "seed"])
def test_lightning_manual_optimization_step_closure_counts_steps(
    lightning: Any, pattern: str
) -> None:
    """optimizer.step(closure) through LightningOptimizer: max_steps ends training; it is SAM."""
    module = manual_module() if pattern == "closure" else seed_pattern_module()
    model, trainer, passes = run_manual(lightning, module)
    print(f"lightning manual {pattern}: global_step {trainer.global_step}, {passes.forward} passes")
    assert trainer.global_step == STEPS
    assert (passes.forward, passes.backward) == (2 * STEPS, 2 * STEPS)
    check(f"lightning manual {pattern}", hand_sam(make_data()), model.net, atol=1e-12)


def test_lightning_manual_first_step_second_step_counts_steps(lightning: Any) -> None:
    model, trainer, passes = run_manual(lightning, two_step_module())
    expected = hand_sam(make_data(), steps=passes.forward // 2)
    check("lightning manual first_step/second_step", expected, model.net, atol=1e-12)
    print(f"lightning manual first_step/second_step: global_step {trainer.global_step}")
    assert trainer.global_step == STEPS


def test_lightning_manual_first_step_keeps_method_state_in_the_checkpointed_optimizer(
    lightning: Any,
) -> None:
    class GsamTwoStep(two_step_module()):  # type: ignore[misc]
        def configure_optimizers(self) -> samfunc.SAM:
            method = samfunc.gsam(rho=RHO, alpha=0.1)
            return samfunc.SAM(self.parameters(), torch.optim.SGD, lr=LR, method=method)

    _, trainer, _ = run_manual(lightning, GsamTwoStep)
    assert trainer.optimizers[0].state_dict().get("method_state") is not None


def test_lightning_manual_float16_loss_scaling_two_step(lightning: Any) -> None:
    """precision="16-mixed" on a GPU; the CPU plugin stands in for CUDA's.

    Its GradScaler calls step() without a closure, so float16 loss scaling goes through
    first_step/second_step(scaler=...).
    """
    from pytorch_lightning.plugins.precision import MixedPrecision

    class Float16(manual_module()):  # type: ignore[misc]
        def training_step(self, batch: Batch, batch_idx: int) -> None:
            x, y = batch
            optimizer = self.optimizers()
            scaler = self.trainer.precision_plugin.scaler
            self.manual_backward(F.mse_loss(self.net(x), y))  # scaled by the plugin
            optimizer.first_step(zero_grad=True, scaler=scaler)
            self.manual_backward(F.mse_loss(self.net(x), y))
            optimizer.second_step(zero_grad=True, scaler=scaler)
            scaler.update()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model, trainer, passes = run_manual(lightning, Float16, torch.float32, plugins=[plugin])
    expected = autocast_reference(make_data(torch.float32), torch.float16, passes.forward // 2)
    check("lightning manual 16-mixed first_step/second_step", expected, model.net, atol=1e-6)
    assert trainer.optimizers[0].skipped_steps == 0
    assert trainer.global_step == STEPS


# --- Lightning: BatchNorm, dropout, self.log and torchmetrics, first pass only ----------------


def make_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5)]
    return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()


def step_seed(step: int) -> int:
    """The seed each step starts from, in Lightning (on_train_batch_start) and in the loop."""
    return 100 + step


class FirstPass:
    """What the hand-written loop records at w, each step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.outputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def abs_errors(self, steps: slice = slice(None)) -> torch.Tensor:
        return torch.cat([(o - t).abs() for o, t in zip(self.outputs, self.targets)][steps])


def hand_sam_bn(data: Batch, reuse_rng: bool) -> tuple[torch.nn.Module, FirstPass]:
    """SAM from the paper around torch.optim.SGD: BatchNorm updated by the pass at w only,
    and with reuse_rng the pass at w + e on the same dropout masks."""
    net = make_bn_net()
    params = list(net.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    first = FirstPass()
    x_all, y_all = data
    for step in range(STEPS):
        x, y = x_all[step * BATCH : (step + 1) * BATCH], y_all[step * BATCH : (step + 1) * BATCH]
        torch.manual_seed(step_seed(step))
        draws = torch.get_rng_state()
        out = net(x)
        loss = F.mse_loss(out, y)
        g = torch.autograd.grad(loss, params)
        first.losses.append(loss.item())
        first.outputs.append(out.detach())
        first.targets.append(y)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        e = [RHO * gi / (norm + 1e-12) for gi in g]
        running = [b.clone() for b in net.buffers()]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        with torch.random.fork_rng():
            if reuse_rng:
                torch.set_rng_state(draws)
            g_s = torch.autograd.grad(F.mse_loss(net(x), y), params)
        with torch.no_grad():
            for b, before in zip(net.buffers(), running):
                b.copy_(before)
            for p, ei, gs in zip(params, e, g_s):
                p.sub_(ei)
                p.grad = gs
        base.step()
    return net, first


def memory_logger(lightning: Any) -> Any:
    class MemoryLogger(lightning.loggers.Logger):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append((-1 if step is None else step, dict(metrics)))

        def logged(self, key: str) -> list[float]:
            return [metrics[key] for _, metrics in self.rows if key in metrics]

    return MemoryLogger()


def bn_module() -> type:
    # recipe: lightning-batchnorm-metrics
    import pytorch_lightning as pl
    import torchmetrics

    class LitSAM(samfunc.LightningSAMMixin, pl.LightningModule):
        def __init__(self, net, reuse_rng):
            super().__init__()
            self.net = net
            self.reuse_rng = reuse_rng
            self.mse = torchmetrics.MeanSquaredError()  # updated each step, read at the end
            self.mae = torchmetrics.MeanAbsoluteError()  # called each step, logged

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.net(x)
            loss = torch.nn.functional.mse_loss(out, y)
            self.mse.update(out, y)
            self.mae(out, y)
            self.log("train_loss", loss)
            self.log("train_mae", self.mae, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return samfunc.SAM(
                self.parameters(),
                torch.optim.SGD,
                rho=0.05,
                lr=0.1,
                momentum=0.9,
                reuse_rng=self.reuse_rng,
            )

    # end recipe
    return LitSAM


@pytest.mark.parametrize("reuse_rng", [False, True])
def test_lightning_automatic_counts_the_first_pass_only(lightning: Any, reuse_rng: bool) -> None:
    """BatchNorm, self.log, torchmetrics and the step's outputs from w; dropout replayed on ask."""
    pytest.importorskip("torchmetrics")
    data = make_data(batches=STEPS)

    class Recorded(bn_module()):  # type: ignore[misc]
        def __init__(self, net: torch.nn.Module, reuse_rng: bool) -> None:
            super().__init__(net, reuse_rng)
            self.masks: list[torch.Tensor] = []
            self.outputs: list[float] = []
            net[2].register_forward_hook(lambda m, i, out: self.masks.append(out == 0))

        def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
            torch.manual_seed(step_seed(batch_idx))

        def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
            self.outputs.append(outputs["loss"].item())

    model = Recorded(make_bn_net(), reuse_rng)
    logger = memory_logger(lightning)
    trainer = make_trainer(lightning, logger=logger, log_every_n_steps=1, max_epochs=1)
    fit(model, trainer, make_loader(data))
    net, first = hand_sam_bn(data, reuse_rng)

    assert trainer.global_step == STEPS
    assert len(model.masks) == 2 * STEPS
    name = f"lightning automatic, LightningSAMMixin, BatchNorm, reuse_rng={reuse_rng}"
    check(name, [p.detach() for p in net.parameters()], model.net, atol=1e-12)
    torch.testing.assert_close(list(model.net.buffers()), list(net.buffers()))
    assert int(model.net[1].num_batches_tracked) == STEPS
    # The loss at w: logged (float32 in Lightning's results), and the step's outputs.
    assert logger.logged("train_loss") == pytest.approx(first.losses, rel=1e-6)
    assert model.outputs == pytest.approx(first.losses, rel=1e-12)
    # The metrics saw each batch once, at w.
    assert int(model.mse.total) == STEPS * BATCH
    expected_mse = torch.cat(first.outputs).sub(torch.cat(first.targets)).pow(2).mean()
    assert model.mse.compute().item() == pytest.approx(expected_mse.item(), rel=1e-6)
    per_step = [first.abs_errors(slice(s, s + 1)).mean().item() for s in range(STEPS)]
    assert logger.logged("train_mae_step") == pytest.approx(per_step, rel=1e-6)
    assert logger.logged("train_mae_epoch") == pytest.approx([first.abs_errors().mean().item()])
    # The same dropout masks in both passes exactly when asked.
    same = [torch.equal(model.masks[2 * s], model.masks[2 * s + 1]) for s in range(STEPS)]
    assert same == [reuse_rng] * STEPS


def test_kept_metric_states_puts_back_a_metric_collection_and_list_states() -> None:
    """Against twins that never see the extra updates; compute groups share states again."""
    torchmetrics = pytest.importorskip("torchmetrics")
    from torchmetrics.classification import BinaryPrecision, BinaryRecall

    from samfunc.integrations.lightning import kept_metric_states

    def metrics() -> torch.nn.ModuleDict:
        collection = torchmetrics.MetricCollection([BinaryPrecision(), BinaryRecall()])
        return torch.nn.ModuleDict({"pr": collection, "cat": torchmetrics.CatMetric()})

    kept, twin = metrics(), metrics()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        p, t = torch.rand(16, generator=generator), torch.randint(0, 2, (16,), generator=generator)
        for m in (kept, twin):
            m["pr"].update(p, t)
            m["cat"].update(p)
        with kept_metric_states(kept):
            kept["pr"].update(1 - p, t)
            kept["pr"](p, t)
            kept["cat"].update(2 * p)
        # getattr: collection[name] would hand out copies of the shared states.
        precision, recall = (getattr(kept["pr"], n) for n in ("BinaryPrecision", "BinaryRecall"))
        assert precision.tp is recall.tp  # still one state for the compute group
        assert precision._update_count == twin["pr"].BinaryPrecision._update_count
    torch.testing.assert_close(kept["pr"].compute(), twin["pr"].compute())
    torch.testing.assert_close(kept["cat"].compute(), twin["cat"].compute())


def test_lightning_mixin_must_come_before_lightning_module(lightning: Any) -> None:
    with pytest.raises(TypeError, match="put it first"):

        class Late(lightning.LightningModule, samfunc.LightningSAMMixin):
            pass


def test_in_second_pass_marks_the_closure_at_w_plus_e_only() -> None:
    """Both patterns of step(closure); first_step/second_step run no closure and never mark."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = samfunc.SAM([w], torch.optim.SGD, rho=RHO, lr=LR)
    seen: list[bool] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        seen.append(samfunc.in_second_pass())
        return loss

    opt.step(closure)
    assert seen == [False, True]
    (w**2).sum().backward()  # the seed's pattern: the closure runs once, at w + e
    opt.step(closure)
    assert seen == [False, True, True]
    closure()
    opt.first_step(zero_grad=True)
    closure()
    opt.second_step(zero_grad=True)
    assert seen == [False, True, True, False, False]
    assert not samfunc.in_second_pass()


# --- Hugging Face Accelerate ------------------------------------------------------------------


@pytest.fixture
def accelerate() -> Iterator[Any]:
    module = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # each test builds its own Accelerator
    GradientState._reset_state()
    yield module
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_closure_loop(accelerator: Any, model: torch.nn.Module, loader: Any) -> None:
    # recipe: accelerate
    optimizer = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn = torch.nn.functional.mse_loss
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def train_step(x, y):
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            return loss

        return optimizer.step(closure)  # at w, then at w + e; returns the loss at w

    for x, y in loader:
        train_step(x, y)
    # end recipe


def accelerate_two_step_loop(accelerator: Any, model: torch.nn.Module, loader: Any) -> None:
    # recipe: accelerate-two-step
    optimizer = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn = torch.nn.functional.mse_loss
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sam = optimizer.optimizer  # AcceleratedOptimizer keeps samfunc.SAM here
    scaler = accelerator.scaler  # a GradScaler with fp16 on a GPU, else None
    for x, y in loader:
        accelerator.backward(loss_fn(model(x), y))  # first pass, at w
        sam.first_step(zero_grad=True, scaler=scaler)
        accelerator.backward(loss_fn(model(x), y))  # second pass, at w + e
        sam.second_step(zero_grad=True, scaler=scaler)
        if scaler is not None:
            scaler.update()
    # end recipe


LOOPS = {
    "step(closure)": accelerate_closure_loop,
    "first_step/second_step": accelerate_two_step_loop,
}


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_accelerate_prepared_optimizer_is_sam(
    accelerate: Any, loop: str, mixed_precision: str
) -> None:
    """Both recipes through AcceleratedOptimizer, in each mixed-precision setting on CPU."""
    dtype = torch.float64 if mixed_precision == "no" else torch.float32
    data = make_data(dtype, batches=STEPS)
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision)
    if mixed_precision == "fp16":  # on CPU: no GradScaler and no autocast, full precision
        assert accelerator.scaler is None and not accelerator.native_amp
    net = make_net(dtype)
    passes = Passes(net)
    LOOPS[loop](accelerator, net, make_loader(data))
    assert (passes.forward, passes.backward) == (2 * STEPS, 2 * STEPS)
    bf16 = mixed_precision == "bf16"
    expected = autocast_reference(data) if bf16 else hand_sam(data, dtype=dtype)
    atol = {"no": 1e-12, "bf16": 1e-6, "fp16": 1e-6}[mixed_precision]
    check(f"accelerate {loop} mixed_precision={mixed_precision}", expected, net, atol)


def test_accelerated_optimizer_does_not_forward_first_step(accelerate: Any) -> None:
    accelerator = accelerate.Accelerator(cpu=True)
    net = make_net()
    optimizer = samfunc.SAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    prepared = accelerator.prepare(optimizer)
    assert not hasattr(prepared, "first_step")
    assert prepared.optimizer is optimizer


def test_accelerate_float16_loss_scaling_two_step(accelerate: Any) -> None:
    """fp16 on a GPU: a GradScaler scales every backward; first_step/second_step unscale each pass.

    On CPU, Accelerate makes no scaler for fp16, so the test gives the Accelerator the one it
    would build on a GPU (before prepare, where AcceleratedOptimizer picks it up). Scales are
    powers of two, so float64 stays exact.
    """
    data = make_data(batches=STEPS)
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    net = make_net()
    accelerate_two_step_loop(accelerator, net, make_loader(data))
    assert accelerator.scaler.get_scale() == 2.0**13  # grew after every (finite) step
    check("accelerate first_step/second_step with a GradScaler", hand_sam(data), net, atol=1e-12)


def test_accelerate_accumulate_skips_the_closure_off_sync_steps(accelerate: Any) -> None:
    """Why the accumulation recipe accumulates inside the closure, not with accumulate()."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = make_net()
    passes = Passes(net)
    optimizer = samfunc.SAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    net, optimizer, loader = accelerator.prepare(net, optimizer, make_loader(make_data(), 4))
    for x, y in loader:
        with accelerator.accumulate(net):

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.mse_loss(net(x), y)
                accelerator.backward(loss)
                return loss

            optimizer.step(closure)
    # 12 micro-batches: the six that do not sync never run at all (AcceleratedOptimizer.step is a
    # no-op there), so each "accumulated" step sees only its last micro-batch.
    assert passes.forward == 12


def test_accelerate_gradient_accumulation_inside_the_closure(accelerate: Any) -> None:
    data = make_data(batches=STEPS)
    net = model = make_net()
    passes = Passes(net)
    accelerator = accelerate.Accelerator(cpu=True)
    loader = make_loader(data)
    # recipe: accelerate-accumulation
    optimizer = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn = torch.nn.functional.mse_loss
    micro_batches = 2  # each batch from the loader, in two parts
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def train_step(x, y):
        def closure():
            optimizer.zero_grad()
            total = 0.0
            for i, (xs, ys) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
                last = i == micro_batches - 1  # under DDP, all-reduce after the last one only
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss = loss_fn(model(xs), ys) / micro_batches
                    accelerator.backward(loss)
                total += loss.detach()
            return total

        return optimizer.step(closure)  # every micro-batch at w, then every one at w + e

    for x, y in loader:
        train_step(x, y)
    # end recipe
    assert (passes.forward, passes.backward) == (4 * STEPS, 4 * STEPS)
    check("accelerate accumulation inside the closure", hand_sam(data), net, atol=1e-12)
