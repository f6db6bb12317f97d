"""Each functional optimizer equals its torch.optim counterpart, step for step."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc
from samfunc import _tree

from .helpers import max_abs_diff
from .strategies import named_parameter_dicts

STEPS = 50
TOLERANCE = 1e-6


def assert_parity(expected: Any, actual: Any) -> None:
    """Within 1e-6 of torch.optim: absolute up to |w| = 1, relative to the leaf's max |w| above.

    torch.optim's ``param.add_(buf, alpha=-lr)`` is one fused multiply-add on
    the CPU, while a functional step rounds ``-lr * buf`` before adding it, so
    the two can differ by an ulp of |w| per step. With lr 0.1 and momentum 0.9
    weights reach |w| ~ 20 in 50 steps, where one float32 ulp is 2e-6: an
    absolute 1e-6 would ask for more than float32 holds there.
    """
    _tree.check_same_structure(expected, actual, "expected", "actual")
    for e, a in zip(_tree.leaves(expected), _tree.leaves(actual)):
        bound = TOLERANCE * max(1.0, e.abs().max().item()) if e.numel() else 0.0
        assert (e - a).abs().max().item() <= bound if e.numel() else True, (
            f"max abs diff {(e - a).abs().max().item():.3g} > {bound:.3g}"
        )


def gradient_sequence(params: dict[str, torch.Tensor], steps: int, seed: int) -> list[Any]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for name, p in params.items()
        }
        for _ in range(steps)
    ]


def run_torch_optim(
    params: dict[str, torch.Tensor], grads: list[Any], make_opt: Callable[..., Any]
) -> dict[str, torch.Tensor]:
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make_opt(list(tensors.values()))
    for g in grads:
        for name, p in tensors.items():
            p.grad = g[name].clone()
        opt.step()
    return {k: v.detach() for k, v in tensors.items()}


def run_functional(
    params: dict[str, torch.Tensor], grads: list[Any], opt: samfunc.GradientTransformation
) -> dict[str, torch.Tensor]:
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = samfunc.apply_updates(params, updates)
    return params


lrs = st.sampled_from([1e-3, 1e-2, 0.1])
weight_decays = st.sampled_from([0.0, 1e-4, 5e-2])


@given(
    params=named_parameter_dicts(),
    lr=lrs,
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.1]),
    nesterov=st.booleans(),
    weight_decay=weight_decays,
    seed=st.integers(0, 1000),
)
def test_sgd_matches_torch_optim(
    params: Any,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    seed: int,
) -> None:
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        nesterov = False
    if momentum == 0.0:
        dampening = 0.0
    grads = gradient_sequence(params, STEPS, seed)
    kwargs = dict(
        momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay
    )
    expected = run_torch_optim(params, grads, lambda p: torch.optim.SGD(p, lr=lr, **kwargs))
    actual = run_functional(params, grads, samfunc.sgd(lr, **kwargs))
    assert_parity(expected, actual)


@given(
    params=named_parameter_dicts(),
    lr=lrs,
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=weight_decays,
    decoupled=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_adam_and_adamw_match_torch_optim(
    params: Any,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
    seed: int,
) -> None:
    grads = gradient_sequence(params, STEPS, seed)
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ours = samfunc.adamw if decoupled else samfunc.adam
    expected = run_torch_optim(
        params,
        grads,
        lambda p: torch_cls(p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
    )
    actual = run_functional(params, grads, ours(lr, *betas, eps, weight_decay=weight_decay))
    assert_parity(expected, actual)


@pytest.mark.parametrize(
    ("name", "ours", "theirs"),
    [
        (
            "sgd",
            samfunc.sgd(0.05, 0.9, nesterov=True, weight_decay=5e-4),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        ),
        (
            "adam",
            samfunc.adam(1e-3, weight_decay=1e-2),
            lambda p: torch.optim.Adam(p, 1e-3, weight_decay=1e-2),
        ),
        ("adamw", samfunc.adamw(1e-3), lambda p: torch.optim.AdamW(p, 1e-3)),
    ],
)
def test_parity_on_a_real_loss(name: str, ours: Any, theirs: Any) -> None:
    """Gradients come from a model's loss at the current parameters, not a fixed list."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(p: Any) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    params, state = dict(start), ours.init(start)
    for _ in range(STEPS):
        grads = torch.func.grad(loss_fn)(params)
        updates, state = ours.update(grads, state, params)
        params = samfunc.apply_updates(params, updates)

    model.load_state_dict(start)
    opt = theirs(list(model.parameters()))
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn({k: v for k, v in model.named_parameters()}).backward()
        opt.step()
    expected = {k: v.detach() for k, v in model.named_parameters()}
    assert_parity(expected, params)


def test_schedule_learning_rate_matches_lr_scheduler() -> None:
    params = {"w": torch.randn(5, dtype=torch.float64)}
    grads = gradient_sequence(params, 30, seed=3)
    tensors = {"w": params["w"].clone().requires_grad_(True)}
    opt = torch.optim.SGD([tensors["w"]], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    for g in grads:
        tensors["w"].grad = g["w"].clone()
        opt.step()
        sched.step()
    ours = samfunc.sgd(samfunc.cosine_decay_schedule(0.1, 30), momentum=0.9)
    actual = run_functional(params, grads, ours)
    assert max_abs_diff({"w": tensors["w"].detach()}, actual) <= 1e-6


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: samfunc.sgd(-0.1), "learning_rate must be >= 0, got -0.1"),
        (lambda: samfunc.sgd(0.1, momentum=1.0), "momentum must be in [0, 1), got 1.0"),
        (lambda: samfunc.sgd(0.1, momentum=-0.5), "momentum must be >= 0, got -0.5"),
        (lambda: samfunc.sgd(0.1, nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda: samfunc.sgd(0.1, 0.9, dampening=0.1, nesterov=True), "dampening == 0"),
        (lambda: samfunc.sgd(0.1, weight_decay=-1.0), "weight_decay must be >= 0, got -1.0"),
        (lambda: samfunc.adam(0.1, b1=1.0), "b1 must be in [0.0, 1.0), got 1.0"),
        (lambda: samfunc.adam(0.1, b2=-0.1), "b2 must be in [0.0, 1.0), got -0.1"),
        (lambda: samfunc.adam(0.1, eps=0.0), "eps must be > 0, got 0.0"),
        (lambda: samfunc.adamw(-1e-3), "learning_rate must be >= 0, got -0.001"),
        (lambda: samfunc.adamw(1e-3, eps=-1.0), "eps must be > 0, got -1.0"),
        (lambda: samfunc.sgd(float("nan")), "learning_rate must be finite, got nan"),
    ],
)
def test_bad_hyperparameters_raise_at_build_time(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)


def test_states_are_namedtuples_of_tensors() -> None:
    params = {"a": torch.ones(2), "b": [torch.ones(3)]}
    for opt in (samfunc.sgd(0.1, 0.9), samfunc.adam(0.1), samfunc.adamw(0.1)):
        state = opt.init(params)
        for leaf in _tree.leaves(state):
            assert isinstance(leaf, torch.Tensor)
