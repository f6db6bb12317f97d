"""Dynamic loss scaling against torch.amp.GradScaler, step for step."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
import torch._dynamo
from hypothesis import example, given
from hypothesis import strategies as st

from samfunc import _tree
from samfunc._loss_scale import (
    LossScaleState,
    dynamic_loss_scale,
    scale_loss,
    unscale_grads,
)

from .helpers import clone_tree
from .strategies import pytrees

INF, NAN = math.inf, math.nan
# GradScaler's tracker is int32 and compared with ==, so this interval never grows.
NEVER = 2**31 - 1


def assert_same(expected: Any, actual: Any) -> None:
    """Trees bitwise equal, NaN included, dtypes too."""
    _tree.check_same_structure(expected, actual, "expected", "actual")
    for path, x, y in zip(_tree.key_paths(expected), _tree.leaves(expected), _tree.leaves(actual)):
        assert x.dtype == y.dtype, f"{path}: {x.dtype} vs {y.dtype}"
        torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True, msg=f"{path} differs")


class Reference:
    """The real GradScaler, driving a one-parameter torch.optim.SGD."""

    def __init__(self, **hyperparameters: Any) -> None:
        self.param = torch.nn.Parameter(torch.zeros(()))
        self.optimizer = torch.optim.SGD([self.param], lr=0.1)
        self.scaler = torch.amp.GradScaler("cpu", **hyperparameters)

    def step(self, finite: bool) -> None:
        self.scaler.scale(self.param * 2.0)  # the first call creates the scale
        self.param.grad = torch.tensor(1.0 if finite else INF)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()

    def tracker(self) -> int:
        return int(self.scaler.state_dict()["_growth_tracker"])


@given(
    init_scale=st.one_of(st.floats(1e-30, 3.4e38), st.sampled_from([2.0**16, 2.0**127])),
    growth_factor=st.floats(1.0, 64.0, exclude_min=True),
    backoff_factor=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    growth_interval=st.integers(1, 5),
    flags=st.lists(st.booleans(), min_size=200, max_size=200),
)
# Growth every third step, with a skipped step now and then.
@example(
    init_scale=2.0**16,
    growth_factor=2.0,
    backoff_factor=0.5,
    growth_interval=3,
    flags=([True] * 7 + [False]) * 25,
)
# Growth would overflow float32: the scale stays.
@example(
    init_scale=2.0**127,
    growth_factor=2.0,
    backoff_factor=0.5,
    growth_interval=1,
    flags=[True] * 200,
)
def test_scale_follows_gradscaler_step_for_step(
    init_scale: float,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    flags: list[bool],
) -> None:
    hyperparameters = {
        "init_scale": init_scale,
        "growth_factor": growth_factor,
        "backoff_factor": backoff_factor,
        "growth_interval": growth_interval,
    }
    reference = Reference(**hyperparameters)
    loss_scale = dynamic_loss_scale(**hyperparameters)
    state = loss_scale.init()
    assert state.scale.dtype == torch.float32 and state.growth_tracker.dtype == torch.int32
    for step, finite in enumerate(flags):
        reference.step(finite)
        before = clone_tree(state)
        new_state = loss_scale.update(state, torch.tensor(finite))
        assert_same(before, state)  # the input state is not modified
        state = new_state
        assert float(state.scale) == reference.scaler.get_scale(), f"step {step}"
        assert int(state.growth_tracker) == reference.tracker(), f"step {step}"
        assert state.scale.dtype == torch.float32 and state.growth_tracker.dtype == torch.int32


@st.composite
def scaled_gradients(draw: st.DrawFn) -> tuple[Any, float]:
    """A float32 tree, some elements replaced by inf, NaN or huge finite values."""
    tree = draw(pytrees(torch.float32))
    leaves, spec = _tree.flatten(tree)
    for _ in range(draw(st.integers(0, 3))):
        which = draw(st.integers(0, len(leaves) - 1))
        flat = leaves[which].reshape(-1).clone()
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([INF, -INF, NAN, 3.4e38, -3e38, 1e30])
        )
        leaves[which] = flat.reshape(leaves[which].shape)
    scale = draw(st.one_of(st.sampled_from([1.0, 2.0**16, 2.0**-3]), st.floats(1e-3, 1e6)))
    return _tree.unflatten(leaves, spec), scale


@given(case=scaled_gradients())
@example(case=({"w": torch.full((4,), 3e38), "b": torch.full((2,), -3e38)}, 2.0**16))
@example(case=({"w": torch.tensor([1.0, NAN]), "b": torch.tensor(INF)}, 3.0))
def test_unscale_grads_equals_gradscaler_unscale(case: tuple[Any, float]) -> None:
    grads, init_scale = case
    original = clone_tree(grads)
    state = dynamic_loss_scale(init_scale=init_scale).init()
    unscaled, finite = unscale_grads(grads, state)
    assert_same(original, grads)  # inputs never mutated

    leaves = _tree.leaves(grads)
    params = [torch.nn.Parameter(torch.zeros_like(leaf)) for leaf in leaves]
    for param, leaf in zip(params, leaves):
        param.grad = leaf.clone()
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=NEVER)
    scaler.scale(torch.zeros(()))
    scaler.unscale_(optimizer)
    assert_same(_tree.unflatten([p.grad for p in params], _tree.flatten(grads)[1]), unscaled)
    # GradScaler found an inf or NaN iff update() backs the scale off.
    scaler.step(optimizer)
    scaler.update()
    scaler_found_finite = scaler.get_scale() == float(state.scale)
    assert finite.dtype == torch.bool and finite.ndim == 0
    assert bool(finite) == scaler_found_finite
    assert bool(finite) == all(bool(torch.isfinite(leaf).all()) for leaf in leaves)


@pytest.mark.parametrize("poison", [None, INF, NAN])
def test_unscale_grads_keeps_dtypes_and_handles_empty_and_huge_leaves(poison: float | None) -> None:
    grads = {
        "half": torch.tensor([1.0, -2.0], dtype=torch.float16),
        "bf16": torch.tensor([[3.0]], dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "huge64": torch.tensor([1e308, 1e308, -1e308], dtype=torch.float64),
        "huge32": torch.tensor([3.4e38, 3.4e38]),
    }
    if poison is not None:
        grads["bf16"] = torch.tensor([[poison]], dtype=torch.bfloat16)
    original = clone_tree(grads)
    state = dynamic_loss_scale(init_scale=4.0).init()
    unscaled, finite = unscale_grads(grads, state)
    assert_same(original, grads)
    assert bool(finite) == (poison is None)  # huge but finite leaves are finite
    for name, leaf in grads.items():
        assert unscaled[name].dtype == leaf.dtype and unscaled[name].shape == leaf.shape
        expected = (leaf.double() / 4.0).to(leaf.dtype)  # / 4 is exact
        torch.testing.assert_close(unscaled[name], expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scale_loss_is_gradscalers_product_in_the_losss_dtype(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    loss = torch.tensor([0.7, 1.3, 2.9])[: 3 if shape else 1].reshape(shape).to(dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
    state = dynamic_loss_scale(init_scale=1000.0).init()
    scaled = scale_loss(loss, state)
    assert scaled.dtype == dtype
    assert_same(scaler.scale(loss).to(dtype), scaled)


def test_functional_sgd_with_loss_scaling_trains_like_gradscaler() -> None:
    """A linear model, some batches poisoned with inf: skipped steps and scale alike."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for step in range(40):
        x, y = torch.randn(8, 3, generator=generator), torch.randn(8, generator=generator)
        if step % 7 == 3:
            x[0, 0] = INF
        batches.append((x, y))
    hyperparameters = {"init_scale": 2.0**10, "growth_factor": 2.0, "growth_interval": 4}

    model = torch.nn.Linear(3, 1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", **hyperparameters)

    def loss_fn(p: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = torch.func.functional_call(model, p, (x,)).squeeze(-1)
        return ((out - y) ** 2).mean()

    loss_scale = dynamic_loss_scale(**hyperparameters)
    state = loss_scale.init()
    skipped = 0
    for batch in batches:
        optimizer.zero_grad()
        scaler.scale(loss_fn(dict(model.named_parameters()), batch)).backward()
        scaler.step(optimizer)
        scaler.update()

        grads = torch.func.grad(lambda p, b=batch, s=state: scale_loss(loss_fn(p, b), s))(params)
        grads, finite = unscale_grads(grads, state)
        params = {
            k: torch.where(finite, torch.add(p, grads[k], alpha=-0.05), p)
            for k, p in params.items()
        }
        state = loss_scale.update(state, finite)
        skipped += not bool(finite)

        assert float(state.scale) == scaler.get_scale()
        for name, param in model.named_parameters():
            torch.testing.assert_close(params[name], param.detach())
    assert skipped == 6


def test_compiled_step_equals_eager_without_recompiling() -> None:
    loss_scale = dynamic_loss_scale(
        init_scale=2.0**10, growth_factor=3.0, backoff_factor=0.25, growth_interval=3
    )

    def step(
        state: LossScaleState, loss: torch.Tensor, grads: Any
    ) -> tuple[torch.Tensor, Any, torch.Tensor, LossScaleState]:
        unscaled, finite = unscale_grads(grads, state)
        return scale_loss(loss, state), unscaled, finite, loss_scale.update(state, finite)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    eager_state = compiled_state = loss_scale.init()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(20):
            grads = {"w": torch.randn(3, 2, generator=generator), "b": torch.randn(2)}
            if i % 5 == 4:
                grads["b"][1] = NAN if i % 2 else INF
            loss = torch.rand((), generator=generator)
            *eager_out, eager_state = step(eager_state, loss, grads)
            *compiled_out, compiled_state = compiled(compiled_state, loss, grads)
            assert_same(eager_out, compiled_out)
            assert_same(eager_state, compiled_state)
    assert float(eager_state.scale) != 2.0**10  # it moved both ways on the way


def test_state_survives_save_and_load() -> None:
    loss_scale = dynamic_loss_scale(init_scale=2.0**8, growth_interval=2)
    flags = [True, True, False, True] * 5
    state = loss_scale.init()
    for finite in flags[:7]:
        state = loss_scale.update(state, torch.tensor(finite))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, LossScaleState)
    assert_same(state, loaded)
    # A resumed run equals an uninterrupted one.
    for finite in flags[7:]:
        state = loss_scale.update(state, torch.tensor(finite))
        loaded = loss_scale.update(loaded, torch.tensor(finite))
        assert_same(state, loaded)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"init_scale": 0.0}, ValueError, "init_scale must be > 0, got 0.0"),
        ({"init_scale": -2.0}, ValueError, "init_scale must be > 0, got -2.0"),
        ({"init_scale": INF}, ValueError, "init_scale must be finite, got inf"),
        ({"init_scale": 1e39}, ValueError, "init_scale must be positive and finite in float32"),
        ({"init_scale": "big"}, TypeError, "init_scale must be a real number, got 'big'"),
        ({"growth_factor": 1.0}, ValueError, "growth_factor must be > 1, got 1.0"),
        ({"growth_factor": NAN}, ValueError, "growth_factor must be finite, got nan"),
        ({"backoff_factor": 1.0}, ValueError, r"backoff_factor must be in \(0, 1\), got 1.0"),
        ({"backoff_factor": 0.0}, ValueError, r"backoff_factor must be in \(0, 1\), got 0.0"),
        ({"backoff_factor": -0.5}, ValueError, r"backoff_factor must be in \(0, 1\), got -0.5"),
        ({"growth_interval": 0}, ValueError, "growth_interval must be >= 1, got 0"),
        ({"growth_interval": 2.5}, TypeError, "growth_interval must be an int, got 2.5"),
        ({"growth_interval": True}, TypeError, "growth_interval must be an int, got True"),
        ({"growth_interval": 2**31}, ValueError, "growth_interval must be <= 2147483647"),
    ],
)
def test_bad_hyperparameters_name_themselves(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        dynamic_loss_scale(**kwargs)


def test_update_rejects_a_finite_flag_that_is_not_a_0d_bool_tensor() -> None:
    loss_scale = dynamic_loss_scale()
    state = loss_scale.init()
    # GradScaler's found_inf is a float with the opposite meaning: refuse it.
    with pytest.raises(TypeError, match=r"finite must be a bool tensor.*got dtype torch.float32"):
        loss_scale.update(state, torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"finite must be a bool tensor.*got True"):
        loss_scale.update(state, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"finite must be a 0-d tensor, got shape \(2,\)"):
        loss_scale.update(state, torch.tensor([True, False]))
