"""samfunc.SAM the way users call it: closures in a loop, checkpoints, pickling, AMP, NaN.

Each test runs several steps and compares with the explicit first_step/second_step
loop (itself checked against the seed's code in test_optim.py), or with the seed.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import samfunc

from .seed_reference import SeedSAM

F = torch.nn.functional
STEPS = 6
DTYPE = torch.float64
Batch = tuple[torch.Tensor, torch.Tensor]


def make() -> tuple[torch.nn.Module, list[Batch]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        DTYPE
    )
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, 5, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (8,), generator=generator),
        )
        for _ in range(STEPS)
    ]
    return model, batches


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-12, rtol=0, msg=key)


def sam(model: torch.nn.Module, **kwargs: Any) -> samfunc.SAM:
    return samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **kwargs)


def explicit_loop(steps: int = STEPS) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The reference: the explicit two-step API, every step."""
    model, batches = make()
    opt = sam(model)
    losses = []
    for x, y in batches[:steps]:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return params_of(model), losses


# --- item 1: step(closure) in a loop ------------------------------------------------------------


def closure_for(
    model: torch.nn.Module, opt: samfunc.SAM, batch: Batch, zero: Callable[[], None] | None
) -> Callable[[], torch.Tensor]:
    x, y = batch

    def closure() -> torch.Tensor:
        if zero is not None:
            zero()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "zero_inside",
    ["opt.zero_grad()", "opt.zero_grad(set_to_none=False)", "model.zero_grad()", "none"],
)
def test_pytorch_closure_pattern_in_a_loop_equals_the_explicit_loop(zero_inside: str) -> None:
    """The closure does everything and step(closure) is called every step (Lightning's way)."""
    expected, expected_losses = explicit_loop()
    model, batches = make()
    opt = sam(model)
    zeros: dict[str, Callable[[], None] | None] = {
        "opt.zero_grad()": lambda: opt.zero_grad(),
        "opt.zero_grad(set_to_none=False)": lambda: opt.zero_grad(set_to_none=False),
        "model.zero_grad()": lambda: model.zero_grad(),
        "none": None,
    }
    losses = [
        opt.step(closure_for(model, opt, batch, zeros[zero_inside])).item() for batch in batches
    ]
    assert_same(expected, params_of(model))
    assert losses == pytest.approx(expected_losses, abs=1e-12)  # the loss at w, each step


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_before_each_closure_step_equals_the_explicit_loop(set_to_none: bool) -> None:
    expected, _ = explicit_loop()
    model, batches = make()
    opt = sam(model)
    for batch in batches:
        opt.zero_grad(set_to_none=set_to_none)
        opt.step(closure_for(model, opt, batch, None))
    assert_same(expected, params_of(model))


def test_seed_closure_pattern_in_a_loop_equals_the_explicit_loop() -> None:
    """The seed's README: backward at w by hand, then step(closure), then zero_grad."""
    expected, _ = explicit_loop()
    model, batches = make()
    opt = sam(model)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.step(closure_for(model, opt, (x, y), None))
        opt.zero_grad()
    assert_same(expected, params_of(model))


def test_seed_pattern_without_zero_grad_between_steps() -> None:
    """zero_grad(set_to_none=False) then the user's backward: fresh gradients, used as is."""
    expected, _ = explicit_loop()
    model, batches = make()
    opt = sam(model)
    for x, y in batches:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step(closure_for(model, opt, (x, y), None))
    assert_same(expected, params_of(model))


def test_lr_scheduler_and_closure_steps_together() -> None:
    model, batches = make()
    opt = sam(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler before optimizer" warning
        for batch in batches:
            opt.step(closure_for(model, opt, batch, opt.zero_grad))
            scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


# --- item 9: pickle, deepcopy, torch.save of the optimizer ---------------------------------------


def run_some(opt: samfunc.SAM, model: torch.nn.Module, batches: list[Batch]) -> None:
    for batch in batches:
        opt.step(closure_for(model, opt, batch, opt.zero_grad))


def roundtrip_pickle(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def roundtrip_torch_save(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, roundtrip_pickle, roundtrip_torch_save])
def test_copied_optimizer_keeps_its_base_optimizer_and_momentum(
    copier: Callable[[Any], Any],
) -> None:
    model, batches = make()
    opt = sam(model)
    run_some(opt, model, batches[:3])
    both = copier({"model": model, "opt": opt})  # one copy: the optimizer keeps the model's params
    twin_model, twin = both["model"], both["opt"]
    assert twin.param_groups is twin.base_optimizer.param_groups
    assert twin.base_optimizer.state, "momentum buffers were lost"
    assert next(iter(twin.param_groups[0]["params"])) is next(twin_model.parameters())
    run_some(opt, model, batches[3:])
    run_some(twin, twin_model, batches[3:])
    assert_same(params_of(model), params_of(twin_model))


def test_optimizer_cannot_be_copied_or_saved_mid_step() -> None:
    model, (batch, *_) = make()
    opt = sam(model)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        copy.deepcopy(opt)
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        opt.state_dict()
    opt.restore()
    opt.state_dict()


# --- item 10: the seed's checkpoints, torch.optim.SGD's, add_param_group --------------------------


def test_a_seed_checkpoint_loads_and_the_run_goes_on_as_the_seeds_would() -> None:
    model, batches = make()
    seed = SeedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for x, y in batches[:3]:
        F.cross_entropy(model(x), y).backward()
        seed.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        seed.second_step(zero_grad=True)
    checkpoint = {"model": params_of(model), "opt": copy.deepcopy(seed.state_dict())}

    def resume(cls: Any) -> dict[str, torch.Tensor]:
        resumed, _ = make()
        resumed.load_state_dict(checkpoint["model"])
        opt = cls(resumed.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        opt.load_state_dict(copy.deepcopy(checkpoint["opt"]))
        for x, y in batches[3:]:
            F.cross_entropy(resumed(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(resumed(x), y).backward()
            opt.second_step(zero_grad=True)
        return params_of(resumed)

    with pytest.warns(UserWarning, match="no base optimizer state"):
        ours = resume(samfunc.SAM)
    assert_same(resume(SeedSAM), ours)


def test_a_plain_sgd_checkpoint_loads_into_the_base_optimizer() -> None:
    """Going on from SGD with SAM at rho=0 is the same run as going on with SGD."""
    model, batches = make()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches[:3]:
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    twin = copy.deepcopy(model)
    opt = samfunc.SAM(twin.parameters(), torch.optim.SGD, rho=0.0, lr=0.5, momentum=0.9)
    opt.load_state_dict(copy.deepcopy(sgd.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["rho"] == 0.0
    assert not opt.state, "the momentum went into SAM's own state"
    assert opt.base_optimizer.state
    for x, y in batches[3:]:
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        sgd.zero_grad()
        opt.step(closure_for(twin, opt, (x, y), opt.zero_grad))
    assert_same(params_of(model), params_of(twin))


def test_add_param_group_on_either_optimizer() -> None:
    model, (batch, *_) = make()
    extra = torch.nn.Linear(5, 3).to(DTYPE)
    opt = samfunc.SAM(model[0].parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.add_param_group({"params": model[2].parameters(), "rho": 0.0})
    opt.base_optimizer.add_param_group({"params": extra.parameters()})  # no rho: the default
    assert opt.param_groups is opt.base_optimizer.param_groups
    with pytest.raises(TypeError, match=r"param_groups\[3\]\['adaptive'\] must be True or False"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "adaptive": "no"})

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(batch[0]) + extra(batch[0]), batch[1])
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.param_groups[2]["rho"] == 0.1 and opt.param_groups[1]["rho"] == 0.0


# --- items 4 and 5: non-finite gradients, flags ------------------------------------------------


class NaNAfterMove(torch.nn.Module):
    """A model whose loss is NaN once its weight has moved (only in the second pass)."""

    def __init__(self, poison_first: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=DTYPE))
        self.start = self.weight.detach().clone()
        self.poison_first = poison_first

    def forward(self) -> torch.Tensor:
        moved = bool((self.weight.detach() != self.start).any())
        bad = moved or self.poison_first
        scale = (
            torch.tensor([float("nan"), 1.0], dtype=DTYPE) if bad else torch.ones(2, dtype=DTYPE)
        )
        return (self.weight**2 * scale).sum()


@pytest.mark.parametrize("poison_first", [True, False])
def test_nonfinite_raise_leaves_params_and_base_state_untouched(poison_first: bool) -> None:
    model = NaNAfterMove(poison_first)
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    before = model.weight.detach().clone()
    which = "first pass, at w" if poison_first else r"second pass, at w \+ e"
    with pytest.raises(samfunc.NonFiniteGradientError, match=which):
        opt.step(lambda: model().backward())
    assert torch.equal(model.weight.detach(), before)
    assert not opt.base_optimizer.state


@pytest.mark.parametrize("poison_first", [True, False])
def test_nonfinite_skip_skips_the_step_and_counts_it(poison_first: bool) -> None:
    model = NaNAfterMove(poison_first)
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1, nonfinite="skip")
    before = model.weight.detach().clone()
    opt.step(lambda: model().backward())
    assert torch.equal(model.weight.detach(), before)
    assert opt.skipped_steps == 1


def test_first_step_with_a_nan_does_not_turn_parameters_into_nan() -> None:
    model, (batch, *_) = make()
    opt = sam(model)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    model[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
    before = params_of(model)
    with pytest.raises(samfunc.NonFiniteGradientError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.first_step()
    assert_same(before, params_of(model))


def test_flags_must_be_bools() -> None:
    params = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(TypeError, match="adaptive must be True or False, got 'False'"):
        samfunc.SAM(params, torch.optim.SGD, adaptive="False", lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['adaptive'\]"):
        samfunc.SAM([{"params": params, "adaptive": 1}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        samfunc.SAM(params, torch.optim.SGD, lr=0.1, nonfinite="ignore")  # type: ignore[arg-type]


def test_sparse_gradients_get_a_clear_error() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = samfunc.SAM(embedding.parameters(), torch.optim.SGD, lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"dense gradients.*sparse=False"):
        opt.first_step()


# --- item 12: GradScaler and autocast ----------------------------------------------------------


def scaled_run(
    scaler: torch.amp.GradScaler | None, dtype: torch.dtype = DTYPE, clip: bool = False
) -> Any:
    model, batches = make()
    model = model.to(dtype)
    opt = sam(model)
    for x, y in batches:
        x = x.to(dtype)
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if clip and scaler is not None:  # the README's clipping recipe, with a bound never hit
            scaler.unscale_(opt.base_optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)
        opt.second_step(zero_grad=True, scaler=scaler)
        if scaler is not None:
            scaler.update()
    return params_of(model), opt


@pytest.mark.parametrize("clip", [False, True])
def test_grad_scaler_unscales_once_per_pass(clip: bool) -> None:
    """With a power-of-two scale and no overflow, scaling is exact: the run equals the unscaled
    one bitwise. Unscaling one pass twice, or not at all, would change it."""
    expected, _ = scaled_run(None, torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    actual, opt = scaled_run(scaler, torch.float32, clip)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert scaler.get_scale() == 2.0**13 and opt.skipped_steps == 0  # grew every 2 steps


@pytest.mark.parametrize("poison_first", [True, False])
def test_grad_scaler_skips_an_inf_in_either_pass_and_backs_off(poison_first: bool) -> None:
    model = NaNAfterMove(poison_first)
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = model.weight.detach().clone()
    scaler.scale(model()).backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(model()).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert torch.equal(model.weight.detach(), before)
    assert not opt.base_optimizer.state
    assert scaler.get_scale() == 2.0**7
    assert opt.skipped_steps == 1


def test_float16_autocast_with_grad_scaler_trains() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        with torch.autocast("cpu", dtype=torch.float16):
            perturbed_loss = F.cross_entropy(model(x), y)
        scaler.scale(perturbed_loss).backward()
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0]


def test_bfloat16_autocast_class_equals_the_seed_under_the_same_autocast() -> None:
    def run(cls: Any) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(3)
        for _ in range(5):
            x, y = (
                torch.randn(16, 8, generator=generator),
                torch.randint(0, 3, (16,), generator=generator),
            )
            for step in (opt.first_step, opt.second_step):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    F.cross_entropy(model(x), y).backward()
                step(zero_grad=True)
        return params_of(model)

    expected = run(SeedSAM)
    actual = run(samfunc.SAM)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-6, msg=key)
