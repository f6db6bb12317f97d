"""data_parallel and all_mean in this process: argument checks, and a one-process group.

The multi-process behaviour is in tests/test_distributed.py; here a gloo group
of one process (world size 1) checks what needs no second process: the
average over one process is the tree itself (any structure, dtype, shape),
and a data-parallel step of one process equals the plain step bitwise.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import samfunc
from samfunc import _tree

from .multiprocess import free_port
from .strategies import pytrees

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _loss(params: Any, batch: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(batch @ params["w"]) ** 2).mean() + params["b"].square().sum()


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(2, generator=gen)}


@pytest.fixture(scope="module")
def one_process_group() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_data_parallel_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        samfunc.data_parallel("both")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"group must be a torch\.distributed ProcessGroup"):
        samfunc.data_parallel("local", group=3)
    assert samfunc.data_parallel() == samfunc.DataParallel("local", None)


def test_engine_options_check_data_parallel() -> None:
    params, batch = _params(), torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"data_parallel must be samfunc\.data_parallel"):
        samfunc.sam_grad(_loss, params, batch, data_parallel="global")  # type: ignore[typeddict-item]
    with pytest.raises(ValueError, match="num_chunks > 1"):
        samfunc.sam_grad(
            _loss, params, batch, num_chunks=2, data_parallel=samfunc.data_parallel("global")
        )
    method = samfunc.ae_sam(rho=0.1)
    with pytest.raises(ValueError, match=r"use samfunc\.data_parallel\('global'\)"):
        method.grad(
            _loss, params, batch, method.init(params), data_parallel=samfunc.data_parallel()
        )
    with pytest.raises(TypeError, match="data_parallel must be"):
        samfunc.make_train_step(_loss, samfunc.sgd(0.1), data_parallel=1)  # type: ignore[typeddict-item]


def test_without_a_process_group_the_error_says_what_to_call() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        samfunc.sam_grad(_loss, _params(), torch.randn(4, 3), data_parallel=samfunc.data_parallel())
    with pytest.raises(RuntimeError, match="init_process_group"):
        samfunc.all_mean({"g": torch.ones(2)})


def test_all_mean_refuses_what_is_not_a_gradient(one_process_group: None) -> None:
    with pytest.raises(TypeError, match=r"floating-point tensors, got torch\.int64 at n"):
        samfunc.all_mean({"g": torch.ones(2), "n": torch.ones(2, dtype=torch.int64)})


@given(
    tree=st.one_of(pytrees(torch.float32), pytrees(torch.float64), pytrees(torch.bfloat16)),
    extra=pytrees(torch.float64, max_leaves=2),
)
def test_all_mean_over_one_process_is_the_tree(
    one_process_group: None, tree: Any, extra: Any
) -> None:
    mixed = [tree, extra]  # two dtypes: one all-reduce (bucket) each
    out = samfunc.all_mean(mixed)
    _tree.check_same_structure(out, mixed, "out", "tree")
    for a, b in zip(_tree.leaves(out), _tree.leaves(mixed)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["local", "global"])
def test_one_process_step_equals_the_plain_step(one_process_group: None, mode: str) -> None:
    opt = samfunc.sgd(0.1, momentum=0.9)
    method = samfunc.looksam(rho=0.1, k=2)
    plain = samfunc.make_train_step(_loss, opt, method=method)
    parallel = samfunc.make_train_step(
        _loss, opt, method=method, data_parallel=samfunc.data_parallel(mode)
    )
    states = [samfunc.init_train_state(_params(), opt, method=method) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        batch = torch.randn(8, 3, generator=gen)
        states[0], ours = parallel(states[0], batch)
        states[1], theirs = plain(states[1], batch)
        assert torch.equal(ours.loss, theirs.loss) and torch.equal(ours.grad_norm, theirs.grad_norm)
    for a, b in zip(_tree.leaves(states[0]), _tree.leaves(states[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("mode", "method", "calls"),
    [
        ("local", None, 1),  # the output, the loss and the state in one buffer
        ("global", None, 2),  # one per pass
        ("local", "vasso", 1),  # VaSSO's moving average rides in the same buffer
        ("global", "momentum_sam", 1),  # one pass
    ],
)
def test_one_all_reduce_per_reduced_pass(
    one_process_group: None, monkeypatch: pytest.MonkeyPatch, mode: str, method: Any, calls: int
) -> None:
    from torch.distributed import _functional_collectives as funcol

    sizes: list[int] = []
    original = funcol.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(funcol, "all_reduce", counting)
    built = {"vasso": samfunc.vasso(rho=0.1), "momentum_sam": samfunc.momentum_sam(rho=0.1)}
    chosen = built.get(method) if method else None
    opt = samfunc.sgd(0.1)
    options: dict[str, Any] = {"data_parallel": samfunc.data_parallel(mode)}
    if chosen is not None:
        options["method"] = chosen
    step = samfunc.make_train_step(_loss, opt, **options)
    state = samfunc.init_train_state(_params(), opt, method=chosen)
    for _ in range(3):
        state, _ = step(state, torch.randn(8, 3))
    assert len(sizes) == 3 * calls
    numel = sum(p.numel() for p in _params().values())
    assert all(size >= numel for size in sizes)  # every leaf (and the loss) in one buffer
