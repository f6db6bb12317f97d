"""Tree comparison helpers for tests."""

from __future__ import annotations

from typing import Any

import torch

from samfunc import _tree


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute leafwise difference between two trees of one structure."""
    _tree.check_same_structure(a, b, "a", "b")
    diffs = [
        (x.double() - y.double()).abs().max().item()
        for x, y in zip(_tree.leaves(a), _tree.leaves(b))
        if x.numel()
    ]
    return max(diffs, default=0.0)


def assert_trees_close(a: Any, b: Any, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    _tree.check_same_structure(a, b, "expected", "actual")
    for path, x, y in zip(_tree.key_paths(a), _tree.leaves(a), _tree.leaves(b)):
        torch.testing.assert_close(y, x, atol=atol, rtol=rtol, msg=lambda m, p=path: f"{p}: {m}")


def assert_trees_equal(a: Any, b: Any) -> None:
    _tree.check_same_structure(a, b, "expected", "actual")
    for path, x, y in zip(_tree.key_paths(a), _tree.leaves(a), _tree.leaves(b)):
        assert x.dtype == y.dtype, f"{path}: {x.dtype} vs {y.dtype}"
        assert torch.equal(x, y), f"{path}: not bitwise equal"


def clone_tree(tree: Any) -> Any:
    return _tree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)
