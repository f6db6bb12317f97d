"""Parts of a batch: splitting, stacking, accumulating and averaging over them.

m-sharpness (``num_chunks``) and accumulation (``accum_steps``) both cut a
batch along dim 0 into equal parts; the engine and ``_sharpness`` share these
helpers. Tensor leaves with a batch dimension are split; other leaves (a
scalar tensor, a Python number, a string) go whole to every part.

Examples:
    >>> import torch
    >>> parts = split_batch((torch.arange(4), 1.0), 2, "num_chunks")
    >>> parts[1]
    (tensor([2, 3]), 1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _tree
from ._tree import PyTree

__all__ = [
    "is_split",
    "split_batch",
    "stack_chunks",
    "select_samples",
    "accumulate",
    "mean_trees",
    "mean_values",
    "stack_trees",
]


def is_split(leaf: Any) -> bool:
    """Tensor leaves with a batch dimension are split; other leaves pass whole."""
    return isinstance(leaf, torch.Tensor) and leaf.ndim > 0


def _part_size(leaves: Sequence[Any], parts: int, name: str) -> int:
    """The size of each of ``parts`` equal pieces of dim 0, after checking it exists."""
    sizes = {leaf.shape[0] for leaf in leaves if is_split(leaf)}
    if len(sizes) != 1:
        raise ValueError(
            f"{name}={parts} splits the batch along dim 0, so every tensor in batch needs the "
            f"same leading size; got sizes {sorted(sizes)}"
        )
    (size,) = sizes
    if size % parts:
        raise ValueError(f"{name}={parts} must divide the batch size {size}")
    return int(size) // parts


def split_batch(batch: PyTree, parts: int, name: str) -> list[PyTree]:
    """Splits every tensor leaf of ``batch`` along dim 0 into ``parts`` equal pieces."""
    leaves, spec = _tree.flatten(batch)
    step = _part_size(leaves, parts, name)
    return [
        _tree.unflatten(
            [leaf[i * step : (i + 1) * step] if is_split(leaf) else leaf for leaf in leaves],
            spec,
        )
        for i in range(parts)
    ]


def stack_chunks(batch: PyTree, parts: int, name: str) -> tuple[PyTree, PyTree]:
    """Reshapes tensor leaves to ``(parts, size // parts, ...)``; returns vmap's in_dims too."""
    leaves, spec = _tree.flatten(batch)
    step = _part_size(leaves, parts, name)
    stacked = [
        leaf.reshape(parts, step, *leaf.shape[1:]) if is_split(leaf) else leaf for leaf in leaves
    ]
    in_dims = [0 if is_split(leaf) else None for leaf in leaves]
    return _tree.unflatten(stacked, spec), _tree.unflatten(in_dims, spec)


def select_samples(batch: PyTree, index: torch.Tensor) -> PyTree:
    """The samples ``index`` picks (along dim 0) from every tensor leaf with a batch dim."""
    return _tree.tree_map(lambda leaf: leaf[index] if is_split(leaf) else leaf, batch)


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
    """Trees of one structure stacked leaf by leaf along a new dim 0."""
    return _tree.tree_map(lambda *xs: torch.stack(xs), *trees)


def mean_values(values: Sequence[Any], has_aux: bool) -> Any:
    """The mean loss over parts; with ``has_aux``, ``(loss, aux stacked over parts)``."""
    if has_aux:
        loss = torch.stack([v[0] for v in values]).mean()
        return loss, stack_trees([v[1] for v in values])
    return torch.stack(list(values)).mean()


def accumulate(
    grad_fn: Callable[..., tuple[PyTree, Any]], params: PyTree, parts: Sequence[PyTree]
) -> tuple[PyTree, list[Any]]:
    """Mean gradient over the parts of a batch, summed as it goes; also each value."""
    grads, values = [], []
    for part in parts:
        part_grads, value = grad_fn(params, part)
        grads.append(part_grads)
        values.append(value)
    return mean_trees(grads), values


def mean_trees(trees: Sequence[PyTree]) -> PyTree:
    """The leafwise mean of trees of one structure: summed in order, then divided."""
    spec = _tree.flatten(trees[0])[1]
    total = _tree.leaves(trees[0])
    for tree in trees[1:]:
        total = _tree.add_leaves(total, _tree.leaves(tree))
    count = float(len(trees))
    if _tree.fused_ops():
        return _tree.unflatten(torch._foreach_div(total, count), spec)
    return _tree.unflatten([t / count for t in total], spec)
