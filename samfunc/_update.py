"""Applying updates to parameters, out of place.

Examples:
    >>> import torch
    >>> import samfunc
    >>> samfunc.apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), -0.5)})
    {'w': tensor([0.5000, 0.5000])}
"""

from __future__ import annotations

import torch

from . import _tree
from ._base import Params, Updates

__all__ = ["apply_updates"]


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates`` as new tensors; neither input is modified.

    Each result keeps its parameter's dtype (updates are cast to it). Leaves
    are paired by key path, never broadcast: a bias update is never added to a
    matrix.

    Raises:
        ValueError: if ``updates`` does not have the structure and shapes of
            ``params`` (e.g. a dict whose keys come in another order), or if
            ``params`` holds an ``nn.Parameter`` (a loop would leak memory).
    """
    _tree.check_same_shapes(params, updates, "params", "updates")
    _tree.check_detached(params, "params")
    param_leaves, spec = _tree.flatten(params)
    update_leaves = [
        u if u.dtype == p.dtype else u.to(p.dtype)
        for p, u in zip(param_leaves, _tree.leaves(updates))
    ]
    if not param_leaves:
        return params
    new_leaves: list[torch.Tensor] = list(torch._foreach_add(param_leaves, update_leaves))
    return _tree.unflatten(new_leaves, spec)
