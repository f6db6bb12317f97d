"""The autograd fast path gives exactly torch.func's first-order gradients."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc
from samfunc._grad import grad_and_value

from .helpers import assert_trees_equal
from .strategies import pytrees


def loss_fn(params: Any, batch: torch.Tensor) -> torch.Tensor:
    leaves = samfunc._tree.leaves(params)
    return (
        sum((torch.tanh(leaf) * batch).sum() ** 2 for leaf in leaves[:-1]) + leaves[-1].sum() * 0.0
    )


def loss_with_aux(params: Any, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = loss_fn(params, batch)
    return loss, {"loss": loss, "first": samfunc._tree.leaves(params)[0] * 2}


@given(params=pytrees(dtype=torch.float64), scale=st.floats(0.1, 2.0), has_aux=st.booleans())
def test_fast_path_equals_torch_func(params: Any, scale: float, has_aux: bool) -> None:
    batch = torch.tensor(scale, dtype=torch.float64)
    fn = loss_with_aux if has_aux else loss_fn
    fast = grad_and_value(fn, has_aux=has_aux)(params, batch)
    reference = torch.func.grad_and_value(fn, has_aux=has_aux)(params, batch)
    assert_trees_equal(reference, fast)
    for leaf in samfunc._tree.leaves(fast):
        assert not leaf.requires_grad  # values and aux come back detached


def test_parameters_in_an_outer_graph_keep_it() -> None:
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    grads, _ = samfunc.sam_grad(lambda p, b: (p["w"] ** 3).sum(), {"w": w}, None, rho=0.1)
    (second,) = torch.autograd.grad(grads["w"].sum(), w)  # differentiates through SAM
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_inside_a_function_transform_torch_func_runs() -> None:
    def per_example(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        grads, _ = grad_and_value(lambda p, b: (p * b).pow(2).sum())(w, x)
        return grads

    w, xs = torch.ones(3), torch.randn(4, 3)
    batched = torch.func.vmap(per_example, in_dims=(None, 0))(w, xs)
    torch.testing.assert_close(batched, 2 * w * xs**2)


def test_aux_comes_back_detached_in_every_usual_shape() -> None:
    from collections import OrderedDict

    from samfunc._module import ModuleAux
    from samfunc._tree import detached

    w = torch.ones(2, requires_grad=True)
    y = w * 2
    shapes = [
        y,
        {"a": y},
        (y, [y, {"b": y}]),
        ModuleAux(buffers={"m": y}, output=(y, 3)),
        OrderedDict(c=y),
        {"n": 1, "t": y},
    ]
    for aux in shapes:
        out = detached(aux)
        assert type(out) is type(aux)
        leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        assert leaves and not any(x.requires_grad for x in leaves)
        assert torch.utils._pytree.tree_structure(out) == torch.utils._pytree.tree_structure(aux)
