from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from samfunc import _tree

from .strategies import Pair, pytrees


def reference_norm(tree: Any) -> float:
    leaves = [t.double().reshape(-1) for t in _tree.leaves(tree)]
    return torch.linalg.vector_norm(torch.cat(leaves)).item()


@given(tree=pytrees())
def test_global_norm_equals_norm_of_concatenation(tree: Any) -> None:
    norm = _tree.global_norm(tree)
    assert norm.dtype == torch.float32 and norm.ndim == 0
    assert norm.item() == pytest.approx(reference_norm(tree), rel=1e-6, abs=1e-7)
    norm64 = _tree.global_norm(_tree.tree_map(torch.Tensor.double, tree))
    assert norm64.dtype == torch.float64
    assert norm64.item() == pytest.approx(reference_norm(tree), rel=1e-12, abs=1e-15)


@given(tree=pytrees(dtype=torch.bfloat16))
def test_global_norm_accumulates_low_precision_in_float32(tree: Any) -> None:
    norm = _tree.global_norm(tree)
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(reference_norm(tree), rel=1e-5, abs=1e-6)


def test_global_norm_of_many_small_leaves_does_not_lose_precision() -> None:
    tree = [torch.full((1000,), 1e-3, dtype=torch.float16) for _ in range(100)]
    assert _tree.global_norm(tree).item() == pytest.approx(reference_norm(tree), rel=1e-3)


@given(tree=pytrees(), factor=st.floats(-3, 3))
def test_add_scaled_and_scale_match_leafwise_arithmetic(tree: Any, factor: float) -> None:
    other = _tree.tree_map(torch.ones_like, tree)
    for got, a in zip(_tree.leaves(_tree.add_scaled(tree, other, factor)), _tree.leaves(tree)):
        torch.testing.assert_close(got, a + factor)
    tensor_factor = torch.tensor(factor)
    for got, a in zip(
        _tree.leaves(_tree.add_scaled(tree, other, tensor_factor)), _tree.leaves(tree)
    ):
        torch.testing.assert_close(got, a + factor)
    for got, a in zip(_tree.leaves(_tree.scale(tree, factor)), _tree.leaves(tree)):
        torch.testing.assert_close(got, a * factor)


@given(tree=pytrees())
def test_zeros_like_keeps_structure_shapes_and_dtypes(tree: Any) -> None:
    zeros = _tree.zeros_like(tree)
    _tree.check_same_structure(tree, zeros, "tree", "zeros")
    for z, t in zip(_tree.leaves(zeros), _tree.leaves(tree)):
        assert z.shape == t.shape and z.dtype == t.dtype and not z.any()


@pytest.mark.parametrize(
    ("other", "where"),
    [
        ({"a": torch.ones(1), "c": [torch.ones(1)]}, "at b: in params but not in grads"),
        ({"a": torch.ones(1), "b": [torch.ones(1), torch.ones(1)]}, "at b: 1 vs 2 children"),
        ({"a": torch.ones(1), "b": (torch.ones(1),)}, "at b: list vs tuple"),
        ({"a": [torch.ones(1)], "b": [torch.ones(1)]}, "at a: a leaf vs list"),
    ],
)
def test_structure_mismatch_names_the_first_differing_key_path(other: Any, where: str) -> None:
    params = {"a": torch.ones(1), "b": [torch.ones(1)]}
    with pytest.raises(
        ValueError, match="grads must have the same tree structure as params"
    ) as info:
        _tree.check_same_structure(params, other, "params", "grads")
    assert where in str(info.value)


def test_namedtuple_paths_use_field_names() -> None:
    tree = {"x": Pair(torch.ones(1), [torch.ones(1)])}
    assert _tree.key_paths(tree) == ["x.first", "x.second.0"]
    other = {"x": Pair(torch.ones(1), [torch.ones(1), torch.ones(1)])}
    with pytest.raises(ValueError, match=r"at x\.second: 1 vs 2 children"):
        _tree.check_same_structure(tree, other, "params", "grads")


@given(tree=pytrees(), data=st.data())
def test_select_then_merge_is_identity(tree: Any, data: st.DataObject) -> None:
    n = len(_tree.leaves(tree))
    flags = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    selected = _tree.select(tree, flags)
    assert len(selected) == sum(flags)
    merged = _tree.merge(tree, selected, flags)
    for a, b in zip(_tree.leaves(merged), _tree.leaves(tree)):
        assert a is b


def test_resolve_mask_accepts_predicates_and_bool_trees() -> None:
    params = {"fc.weight": torch.ones(2), "fc.bias": torch.ones(1)}
    assert _tree.resolve_mask(
        lambda path, leaf: leaf.ndim > 0 and path.endswith("weight"), params
    ) == [
        True,
        False,
    ]
    assert _tree.resolve_mask({"fc.weight": False, "fc.bias": True}, params) == [False, True]
    with pytest.raises(ValueError, match="mask must have the same tree structure"):
        _tree.resolve_mask({"fc.weight": True}, params)
    with pytest.raises(TypeError, match=r"mask must hold Python bools, got Tensor at fc\.bias"):
        _tree.resolve_mask({"fc.weight": True, "fc.bias": torch.tensor(True)}, params)


FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


@given(
    tree=pytrees(),
    dtype=FLOAT_DTYPES,
    poison=st.sampled_from([None, math.nan, math.inf, -math.inf]),
    where=st.integers(0, 10**6),
)
def test_norm_is_finite_is_exact_and_leaves_values_alone(
    tree: Any, dtype: torch.dtype, poison: float | None, where: int
) -> None:
    tree = _tree.tree_map(lambda t: t.to(dtype), tree)
    leaves = _tree.leaves(tree)
    if poison is not None:
        leaf = leaves[where % len(leaves)]
        if leaf.numel():
            leaf.view(-1)[where % leaf.numel()] = poison
    before = [t.clone() for t in leaves]
    expected = all(bool(torch.isfinite(t).all()) for t in leaves)
    assert _tree.norm_is_finite(tree) is expected
    assert bool(_tree.all_finite(tree)) is expected
    for old, new in zip(before, leaves):  # the fused check rewrites each element as itself
        assert torch.equal(old, new) or (old.isnan() == new.isnan()).all()


def test_norm_is_finite_takes_the_exact_path_where_it_cannot_write() -> None:
    big = torch.full((4,), 3e38)
    expanded = torch.tensor([1.0]).expand(3)  # one element under three indices
    leaf = torch.ones(2, requires_grad=True)
    mixed = [torch.ones(2), torch.ones(2, dtype=torch.float64)]
    for tree in ([big, big], [expanded], [leaf], mixed, [torch.ones(2), torch.ones(2, 2).t()]):
        assert _tree.norm_is_finite(tree)
    assert not _tree.norm_is_finite([torch.tensor([float("inf")]).expand(3)])
    with torch.inference_mode():
        frozen = torch.ones(3)
    assert _tree.norm_is_finite([frozen])


@given(tree=pytrees(), dtype=FLOAT_DTYPES, seed=st.integers(0, 2**31 - 1))
def test_vdot_equals_the_dot_product_of_the_concatenations(
    tree: Any, dtype: torch.dtype, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = _tree.tree_map(lambda t: t.to(dtype), tree)
    b = _tree.tree_map(lambda t: torch.randn(t.shape, generator=generator).to(dtype), tree)
    flat = [torch.cat([t.double().reshape(-1) for t in _tree.leaves(x)]) for x in (a, b)]
    expected = float(flat[0] @ flat[1])
    got = _tree.vdot(a, b)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = float(flat[0].abs() @ flat[1].abs()) + 1e-30
    tolerance = 1e-14 if dtype == torch.float64 else 1e-5
    assert abs(got.item() - expected) <= tolerance * scale
