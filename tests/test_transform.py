from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc
from samfunc import _tree

from .helpers import assert_trees_equal, clone_tree
from .strategies import pytrees

OPTIMIZERS = {
    "sgd": lambda: samfunc.sgd(0.1),
    "sgd_momentum": lambda: samfunc.sgd(0.1, 0.9, dampening=0.1, weight_decay=1e-3),
    "nesterov": lambda: samfunc.sgd(samfunc.cosine_decay_schedule(0.1, 20), 0.9, nesterov=True),
    "adam": lambda: samfunc.adam(1e-2, weight_decay=1e-3),
    "adamw": lambda: samfunc.adamw(samfunc.linear_schedule(1e-2, 0.0, 20)),
    "clipped": lambda: samfunc.chain(samfunc.clip_by_global_norm(0.5), samfunc.sgd(0.1, 0.9)),
}


def gradients(tree: Any, step: int) -> Any:
    generator = torch.Generator().manual_seed(step)
    return _tree.tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype), tree)


@given(params=pytrees(), updates_seed=st.integers(0, 100))
def test_apply_updates_is_out_of_place(params: Any, updates_seed: int) -> None:
    updates = gradients(params, updates_seed)
    params_before, updates_before = clone_tree(params), clone_tree(updates)
    new = samfunc.apply_updates(params, updates)
    assert_trees_equal(params_before, params)
    assert_trees_equal(updates_before, updates)
    for n, p, u in zip(_tree.leaves(new), _tree.leaves(params), _tree.leaves(updates)):
        torch.testing.assert_close(n, p + u)


def test_apply_updates_keeps_parameter_dtype_and_checks_structure() -> None:
    params = {"w": torch.ones(2, dtype=torch.bfloat16)}
    new = samfunc.apply_updates(params, {"w": torch.full((2,), 0.5)})
    assert new["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="updates must have the same tree structure as params"):
        samfunc.apply_updates(params, {"v": torch.ones(2)})


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@given(params=pytrees())
def test_update_never_mutates_its_inputs(name: str, params: Any) -> None:
    opt = OPTIMIZERS[name]()
    state = opt.init(params)
    grads = gradients(params, 0)
    snapshot = clone_tree((params, grads, state))
    opt.update(grads, state, params)
    assert_trees_equal(snapshot, (params, grads, state))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@given(params=pytrees())
def test_chain_of_one_equals_the_transform(name: str, params: Any) -> None:
    opt, chained = OPTIMIZERS[name](), samfunc.chain(OPTIMIZERS[name]())
    state, chained_state = opt.init(params), chained.init(params)
    for step in range(3):
        grads = gradients(params, step)
        u1, state = opt.update(grads, state, params)
        u2, chained_state = chained.update(grads, chained_state, params)
        assert_trees_equal(u1, u2)


@given(params=pytrees(), data=st.data())
def test_masked_leaves_pass_through_untouched(params: Any, data: st.DataObject) -> None:
    n = len(_tree.leaves(params))
    flags = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = _tree.unflatten(flags, _tree.flatten(params)[1])
    inner = samfunc.chain(samfunc.trace(0.9), samfunc.scale(-0.1))
    opt = samfunc.masked(inner, mask)
    state = opt.init(params)
    reference_state = inner.init(_tree.select(params, flags))
    for step in range(3):
        grads = gradients(params, step)
        out, state = opt.update(grads, state, params)
        for keep, o, g in zip(flags, _tree.leaves(out), _tree.leaves(grads)):
            if not keep:
                assert o is g
        if any(flags):
            expected, reference_state = inner.update(_tree.select(grads, flags), reference_state)
            assert_trees_equal(expected, _tree.select(out, flags))


def test_masked_weight_decay_by_path_predicate_is_a_param_group() -> None:
    params = {"fc.weight": torch.ones(2), "fc.bias": torch.ones(1)}
    no_bias = samfunc.masked(samfunc.add_decayed_weights(0.5), lambda path, _: "bias" not in path)
    grads = {"fc.weight": torch.zeros(2), "fc.bias": torch.zeros(1)}
    out, _ = no_bias.update(grads, no_bias.init(params), params)
    assert torch.equal(out["fc.weight"], torch.full((2,), 0.5))
    assert torch.equal(out["fc.bias"], torch.zeros(1))


@given(params=pytrees(), max_norm=st.floats(0.01, 10.0), scale=st.floats(1e-3, 1e3))
def test_clip_by_global_norm_keeps_direction_and_bounds_the_norm(
    params: Any, max_norm: float, scale: float
) -> None:
    grads = _tree.scale(gradients(params, 1), scale)
    clip = samfunc.clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(params))
    norm_before = _tree.global_norm(grads).item()
    norm_after = _tree.global_norm(clipped).item()
    assert norm_after <= max_norm * (1 + 1e-5)
    if norm_before <= max_norm:
        assert_trees_equal(grads, clipped)
    factor = norm_after / norm_before
    for c, g in zip(_tree.leaves(clipped), _tree.leaves(grads)):
        torch.testing.assert_close(c, g * factor, rtol=1e-5, atol=1e-7)


def test_clip_equals_torch_clip_grad_norm() -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    grads = [torch.randn_like(t) * 10 for t in tensors]
    for t, g in zip(tensors, grads):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.0)
    clip = samfunc.clip_by_global_norm(1.0)
    ours, _ = clip.update(grads, clip.init(grads))
    for t, o in zip(tensors, ours):
        torch.testing.assert_close(o, t.grad)


def test_trace_first_step_buffer_is_the_gradient_even_with_dampening() -> None:
    opt = samfunc.trace(0.9, dampening=0.5)
    params = [torch.zeros(2)]
    state = opt.init(params)
    first, state = opt.update([torch.ones(2)], state)
    assert torch.equal(first[0], torch.ones(2))
    second, _ = opt.update([torch.ones(2)], state)
    torch.testing.assert_close(second[0], torch.full((2,), 0.9 + 0.5))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumed_run_is_bitwise_identical(name: str) -> None:
    """Save the state after k steps, reload it, continue: same bits as one run."""
    torch.manual_seed(0)
    params = {"layer": [torch.randn(4, 3), torch.randn(3)], "scale": torch.randn(())}
    opt = OPTIMIZERS[name]()

    def run(params: Any, state: Any, steps: range) -> tuple[Any, Any]:
        for step in steps:
            updates, state = opt.update(gradients(params, step), state, params)
            params = samfunc.apply_updates(params, updates)
        return params, state

    straight, _ = run(params, opt.init(params), range(12))
    half, state = run(params, opt.init(params), range(5))
    buffer = io.BytesIO()
    torch.save({"params": half, "state": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    resumed, _ = run(loaded["params"], loaded["state"], range(5, 12))
    assert_trees_equal(straight, resumed)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: samfunc.trace(1.0), ValueError, "momentum must be in [0.0, 1.0), got 1.0"),
        (
            lambda: samfunc.trace(0.9, dampening=2.0),
            ValueError,
            "dampening must be in [0, 1], got 2.0",
        ),
        (lambda: samfunc.clip_by_global_norm(0.0), ValueError, "max_norm must be > 0, got 0.0"),
        (
            lambda: samfunc.add_decayed_weights(-1.0),
            ValueError,
            "weight_decay must be >= 0, got -1.0",
        ),
        (lambda: samfunc.scale("x"), TypeError, "step_size must be a real number, got 'x'"),
        (lambda: samfunc.chain(samfunc.scale(1.0), 3), TypeError, "argument 1 is int"),
        (lambda: samfunc.masked(None, []), TypeError, "inner must be a GradientTransformation"),
        (lambda: samfunc.scale_by_schedule(0.1), TypeError, "step_size_fn must be callable"),
    ],
)
def test_transforms_validate_on_build(build: Any, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        build()
    assert message in str(info.value)


def test_weight_decay_without_params_says_what_to_pass() -> None:
    opt = samfunc.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="needs params"):
        opt.update([torch.ones(1)], opt.init([torch.ones(1)]))
