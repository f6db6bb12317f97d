"""Hypothesis strategies for pytrees of tensors and optimizer hyperparameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from hypothesis import strategies as st

SHAPES = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


class Pair(NamedTuple):
    first: Any
    second: Any


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype = torch.float32, shape: Any = None) -> torch.Tensor:
    """A tensor of a drawn shape, filled from a drawn seed (cheap to shrink)."""
    shape = draw(SHAPES) if shape is None else shape
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def pytrees(dtype: torch.dtype = torch.float32, max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Nested dicts, lists, tuples and NamedTuples with at least one tensor leaf."""
    leaf = tensors(dtype)
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.dictionaries(
                st.text("abcdefgh", min_size=1, max_size=3), children, min_size=1, max_size=3
            ),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.tuples(children, children).map(lambda ab: Pair(*ab)),
        ),
        max_leaves=max_leaves,
    )


def named_parameter_dicts(dtype: torch.dtype = torch.float32) -> st.SearchStrategy[Any]:
    """Flat dicts shaped like ``dict(model.named_parameters())``."""
    names = st.sampled_from(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "norm.weight"])
    return st.dictionaries(names, tensors(dtype), min_size=1, max_size=5)
