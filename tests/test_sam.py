"""sam_grad against independent references: the seed's loop, analytic results."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc
from samfunc import _tree

from .helpers import assert_trees_close, assert_trees_equal, clone_tree, max_abs_diff
from .seed_reference import SeedSAM

DTYPE = torch.float64


# --- a small model written as a pure function of a params dict ---------------------------------


def make_mlp(widths: list[int], seed: int, dtype: torch.dtype = DTYPE) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        params[f"layer{i}.weight"] = torch.randn(fan_out, fan_in, generator=generator, dtype=dtype)
        params[f"layer{i}.weight"] /= fan_in**0.5
        params[f"layer{i}.bias"] = 0.1 * torch.randn(fan_out, generator=generator, dtype=dtype)
    return params


def mlp_loss(
    params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    x, y = batch
    depth = len(params) // 2
    for i in range(depth):
        x = x @ params[f"layer{i}.weight"].T + params[f"layer{i}.bias"]
        if i < depth - 1:
            x = torch.tanh(x)
    return torch.nn.functional.cross_entropy(x, y)


def make_batch(n: int, features: int, classes: int, seed: int, dtype: torch.dtype = DTYPE) -> Any:
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, features, generator=generator, dtype=dtype)
    return x, torch.randint(0, classes, (n,), generator=generator)


# --- the seed's algorithm, written out with plain autograd --------------------------------------


def seed_sam_gradient(
    loss_fn: Callable[..., torch.Tensor],
    params: dict[str, torch.Tensor],
    batch: Any,
    rho: float,
    adaptive: bool = False,
    perturb: Callable[[str], bool] = lambda name: True,
) -> tuple[dict[str, torch.Tensor], float]:
    """first_step / second_step of the seed SAM class, over a dict of tensors."""
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_fn(w, batch)
    grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
    names = [k for k in w if perturb(k)]
    with torch.no_grad():
        grad_norm = torch.norm(
            torch.stack(
                [((torch.abs(w[k]) if adaptive else 1.0) * grads[k]).norm(p=2) for k in names]
            ),
            p=2,
        )
        scale = rho / (grad_norm + 1e-12)
        for k in names:
            e_w = (torch.pow(w[k], 2) if adaptive else 1.0) * grads[k] * scale
            w[k].add_(e_w)
    second = torch.autograd.grad(loss_fn(w, batch), list(w.values()))
    return dict(zip(w, second)), loss.item()


widths = st.lists(st.integers(1, 6), min_size=2, max_size=4).map(lambda ws: [3, *ws])
rhos = st.floats(0.0, 1.0)


@given(widths=widths, rho=rhos, adaptive=st.booleans(), seed=st.integers(0, 1000))
def test_sam_grad_equals_the_seeds_loop(
    widths: list[int], rho: float, adaptive: bool, seed: int
) -> None:
    params = make_mlp(widths, seed)
    batch = make_batch(8, 3, widths[-1], seed)
    expected, expected_loss = seed_sam_gradient(mlp_loss, params, batch, rho, adaptive)
    grads, loss = samfunc.sam_grad(mlp_loss, params, batch, rho=rho, adaptive=adaptive)
    assert_trees_close(expected, grads, atol=1e-10, rtol=1e-9)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)


@given(widths=widths, rho=rhos, seed=st.integers(0, 1000), data=st.data())
def test_mask_by_predicate_equals_the_seeds_loop_over_the_selected_leaves(
    widths: list[int], rho: float, seed: int, data: st.DataObject
) -> None:
    params = make_mlp(widths, seed)
    batch = make_batch(8, 3, widths[-1], seed)
    keep = data.draw(st.sampled_from(["weight", "bias", "layer0"]))
    expected, _ = seed_sam_gradient(mlp_loss, params, batch, rho, perturb=lambda k: keep in k)
    grads, _ = samfunc.sam_grad(mlp_loss, params, batch, rho=rho, mask=lambda path, _: keep in path)
    assert_trees_close(expected, grads, atol=1e-10, rtol=1e-9)
    flags = {k: keep in k for k in params}
    grads_from_tree_mask, _ = samfunc.sam_grad(mlp_loss, params, batch, rho=rho, mask=flags)
    assert_trees_equal(grads, grads_from_tree_mask)


# --- properties of the perturbation -------------------------------------------------------------


def random_like(tree: Any, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return _tree.tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype), tree)


@given(widths=widths, rho=st.floats(1e-3, 2.0), seed=st.integers(0, 1000), eta=st.floats(0.0, 0.1))
def test_e_has_norm_rho_and_asam_e_over_t_has_norm_rho(
    widths: list[int], rho: float, seed: int, eta: float
) -> None:
    params = make_mlp(widths, seed)
    grads = random_like(params, seed + 7)
    e = samfunc.perturbation(params, grads, rho)
    assert _tree.global_norm(e).item() == pytest.approx(rho, rel=1e-9)
    e_asam = samfunc.perturbation(params, grads, rho, adaptive=True, eta=eta)
    e_over_t = _tree.tree_map(lambda ei, w: ei / (w.abs() + eta), e_asam, params)
    assert _tree.global_norm(e_over_t).item() == pytest.approx(rho, rel=1e-9)


@given(widths=widths, seed=st.integers(0, 1000), adaptive=st.booleans())
def test_rho_zero_gives_the_plain_gradient(widths: list[int], seed: int, adaptive: bool) -> None:
    params = make_mlp(widths, seed)
    batch = make_batch(8, 3, widths[-1], seed)
    plain = torch.func.grad(mlp_loss)(params, batch)
    grads, _ = samfunc.sam_grad(mlp_loss, params, batch, rho=0.0, adaptive=adaptive)
    assert_trees_equal(plain, grads)


@given(widths=widths, rho=rhos, seed=st.integers(0, 1000))
def test_inputs_are_never_mutated(widths: list[int], rho: float, seed: int) -> None:
    params = make_mlp(widths, seed)
    batch = make_batch(8, 3, widths[-1], seed)
    before = clone_tree((params, batch))
    samfunc.sam_grad(mlp_loss, params, batch, rho=rho, adaptive=True)
    samfunc.sam_grad(mlp_loss, params, batch, rho=rho, num_chunks=2)
    samfunc.sam_grad(mlp_loss, params, batch, rho=rho, accum_steps=4)
    samfunc.perturbation(params, params, rho)
    assert_trees_equal(before, (params, batch))


@given(
    n=st.integers(1, 6),
    rho=st.floats(1e-3, 1.0),
    seed=st.integers(0, 1000),
    norm=st.sampled_from(["l2", "none", "inf"]),
)
def test_quadratic_has_the_analytic_sam_gradient(n: int, rho: float, seed: int, norm: str) -> None:
    """L(w) = 1/2 w^T A w: grad = A w and SAM grad = A (w + e(A w))."""
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=generator, dtype=DTYPE)
    a = root @ root.T + torch.eye(n, dtype=DTYPE)
    w = torch.randn(n, generator=generator, dtype=DTYPE)

    def loss_fn(params: Any, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * params["w"] @ batch @ params["w"]

    g = a @ w
    e = {"l2": rho * g / g.norm(), "none": rho * g, "inf": rho * torch.sign(g)}[norm]
    grads, loss = samfunc.sam_grad(loss_fn, {"w": w}, a, rho=rho, norm=norm)  # type: ignore[arg-type]
    torch.testing.assert_close(grads["w"], a @ (w + e), rtol=1e-10, atol=1e-10)
    assert loss.item() == pytest.approx(0.5 * (w @ a @ w).item())


@pytest.mark.parametrize("norm", ["l2", "none", "inf"])
def test_zero_gradient_gives_a_finite_plain_gradient(norm: str) -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        params = {"w": torch.zeros(4, dtype=dtype)}
        grads, _ = samfunc.sam_grad(
            lambda p, b: (p["w"].float() ** 2).sum(),
            params,
            None,
            norm=norm,  # type: ignore[arg-type]
        )
        assert torch.equal(grads["w"], torch.zeros(4, dtype=dtype))
        e = samfunc.perturbation(params, {"w": torch.zeros(4, dtype=dtype)}, 0.05, norm=norm)  # type: ignore[arg-type]
        assert torch.isfinite(e["w"]).all()


def test_tiny_float16_gradients_do_not_overflow() -> None:
    params = {"w": torch.ones(3, dtype=torch.float16)}
    grads = {"w": torch.full((3,), 6e-8, dtype=torch.float16)}
    e = samfunc.perturbation(params, grads, 0.05)
    assert torch.isfinite(e["w"]).all()
    assert _tree.global_norm(e).item() == pytest.approx(0.05, rel=1e-2)


def test_asam_mask_rescales_only_the_selected_leaves() -> None:
    """The ASAM authors' variant: T = |w| + eta on weights, T = 1 on biases."""
    params = make_mlp([3, 4, 2], seed=0)
    grads = random_like(params, 1)
    e = samfunc.perturbation(
        params, grads, 0.5, adaptive=lambda path, _: path.endswith("weight"), eta=0.01
    )
    t = {
        k: (v.abs() + 0.01) if k.endswith("weight") else torch.ones_like(v)
        for k, v in params.items()
    }
    tg = {k: t[k] * grads[k] for k in params}
    norm = torch.sqrt(sum((v**2).sum() for v in tg.values()))
    expected = {k: 0.5 * t[k] * tg[k] / (norm + 1e-12) for k in params}
    assert_trees_close(expected, e, atol=1e-12, rtol=1e-10)


def test_perturbed_params_is_params_plus_perturbation() -> None:
    params = make_mlp([3, 4, 2], seed=0)
    grads = random_like(params, 1)
    mask = {k: "weight" in k for k in params}
    moved = samfunc.perturbed_params(params, grads, 0.3, mask=mask, adaptive=True)
    e = samfunc.perturbation(params, grads, 0.3, mask=mask, adaptive=True)
    assert_trees_close(_tree.add_scaled(params, e, 1.0), moved, atol=1e-15, rtol=1e-15)
    assert moved["layer0.bias"] is params["layer0.bias"]


def test_has_aux_returns_the_first_pass_aux() -> None:
    params = make_mlp([3, 4, 2], seed=0)
    batch = make_batch(8, 3, 2, seed=0)

    def loss_with_aux(p: Any, b: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = mlp_loss(p, b)
        return loss, {"weight_sum": p["layer0.weight"].sum().detach(), "loss": loss.detach()}

    grads, (loss, aux) = samfunc.sam_grad(loss_with_aux, params, batch, rho=0.5, has_aux=True)
    assert aux["weight_sum"].item() == pytest.approx(params["layer0.weight"].sum().item())
    assert aux["loss"].item() == pytest.approx(loss.item())
    plain, _ = samfunc.sam_grad(mlp_loss, params, batch, rho=0.5)
    assert_trees_equal(plain, grads)


def test_tensor_rho_equals_float_rho() -> None:
    params = make_mlp([3, 4, 2], seed=0)
    batch = make_batch(8, 3, 2, seed=0)
    a, _ = samfunc.sam_grad(mlp_loss, params, batch, rho=0.2)
    b, _ = samfunc.sam_grad(mlp_loss, params, batch, rho=torch.tensor(0.2, dtype=DTYPE))
    assert_trees_close(a, b, atol=1e-12, rtol=1e-12)
    sam_fn = samfunc.sam_grad_and_value(mlp_loss, rho=0.9)
    c, _ = sam_fn(params, batch, rho=torch.tensor(0.2, dtype=DTYPE))
    assert_trees_close(a, c, atol=1e-12, rtol=1e-12)


# --- m-sharpness and accumulation ---------------------------------------------------------------


@given(
    widths=widths,
    rho=rhos,
    num_chunks=st.sampled_from([1, 2, 4]),
    adaptive=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_m_sharpness_equals_a_loop_over_chunks(
    widths: list[int], rho: float, num_chunks: int, adaptive: bool, seed: int
) -> None:
    params = make_mlp(widths, seed)
    x, y = make_batch(8, 3, widths[-1], seed)
    size = 8 // num_chunks
    per_chunk = [
        seed_sam_gradient(mlp_loss, params, (x[i : i + size], y[i : i + size]), rho, adaptive)
        for i in range(0, 8, size)
    ]
    expected = {k: torch.stack([g[k] for g, _ in per_chunk]).mean(0) for k in params}
    expected_loss = sum(loss for _, loss in per_chunk) / num_chunks
    grads, loss = samfunc.sam_grad(
        mlp_loss, params, (x, y), rho=rho, adaptive=adaptive, num_chunks=num_chunks
    )
    assert_trees_close(expected, grads, atol=1e-10, rtol=1e-9)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-10)


def test_m_sharpness_stacks_aux_per_chunk() -> None:
    params = make_mlp([3, 4, 2], seed=0)
    batch = make_batch(8, 3, 2, seed=0)

    def loss_with_aux(p: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loss = mlp_loss(p, b)
        return loss, loss.detach()

    _, (loss, aux) = samfunc.sam_grad(loss_with_aux, params, batch, has_aux=True, num_chunks=4)
    assert aux.shape == (4,)
    assert loss.item() == pytest.approx(aux.mean().item())


@given(
    widths=widths,
    rho=rhos,
    accum_steps=st.sampled_from([1, 2, 4, 8]),
    adaptive=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_accumulation_equals_the_full_batch(
    widths: list[int], rho: float, accum_steps: int, adaptive: bool, seed: int
) -> None:
    params = make_mlp(widths, seed)
    batch = make_batch(8, 3, widths[-1], seed)
    full, full_loss = samfunc.sam_grad(mlp_loss, params, batch, rho=rho, adaptive=adaptive)
    accumulated, loss = samfunc.sam_grad(
        mlp_loss, params, batch, rho=rho, adaptive=adaptive, accum_steps=accum_steps
    )
    assert max_abs_diff(full, accumulated) <= 1e-12
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-12)


def test_accumulation_runs_one_micro_batch_at_a_time() -> None:
    sizes: list[int] = []

    def spying_loss(p: Any, b: Any) -> torch.Tensor:
        sizes.append(b[0].shape[0])
        return mlp_loss(p, b)

    params = make_mlp([3, 4, 2], seed=0)
    samfunc.sam_grad(spying_loss, params, make_batch(12, 3, 2, seed=0), accum_steps=3)
    assert sizes == [4] * 6


def test_batch_leaves_that_are_not_tensors_are_passed_whole() -> None:
    params = make_mlp([3, 4, 2], seed=0)
    x, y = make_batch(8, 3, 2, seed=0)

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return mlp_loss(p, (b["x"], b["y"])) * b["scale"]

    batch = {"x": x, "y": y, "scale": 2.0}
    full, _ = samfunc.sam_grad(loss_fn, params, batch)
    accumulated, _ = samfunc.sam_grad(loss_fn, params, batch, accum_steps=2)
    assert max_abs_diff(full, accumulated) <= 1e-12
    samfunc.sam_grad(loss_fn, params, batch, num_chunks=2)


# --- errors -------------------------------------------------------------------------------------


PARAMS = {"w": torch.ones(3)}


def quadratic(p: Any, b: Any) -> torch.Tensor:
    return (p["w"] ** 2).sum()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rho": -0.1}, ValueError, "rho must be >= 0, got -0.1"),
        ({"rho": float("inf")}, ValueError, "rho must be finite, got inf"),
        ({"rho": float("nan")}, ValueError, "rho must be finite, got nan"),
        ({"rho": torch.ones(2)}, ValueError, "rho must be a float or a floating-point 0-d tensor"),
        ({"eta": -1.0}, ValueError, "eta must be >= 0, got -1.0"),
        ({"norm": "l1"}, ValueError, "norm must be one of ('l2', 'none', 'inf'), got 'l1'"),
        ({"num_chunks": 0}, ValueError, "num_chunks must be >= 1, got 0"),
        ({"accum_steps": 2.0}, TypeError, "accum_steps must be an int, got 2.0"),
        ({"num_chunks": 2, "accum_steps": 2}, ValueError, "cannot both be > 1"),
    ],
)
def test_bad_options_name_the_argument(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error) as info:
        samfunc.sam_grad(quadratic, PARAMS, torch.ones(4, 1), **kwargs)
    assert message in str(info.value)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(
        ValueError, match=r"loss_fn must return a scalar \(0-d\) tensor loss, got \(3,\)"
    ):
        samfunc.sam_grad(lambda p, b: p["w"] ** 2, PARAMS, None)
    with pytest.raises(ValueError, match="must return a \\(loss, aux\\) pair"):
        samfunc.sam_grad(quadratic, PARAMS, None, has_aux=True)
    with pytest.raises(
        TypeError, match=r"params must hold floating-point tensors, got torch\.int64 at n"
    ):
        samfunc.sam_grad(
            quadratic, {"w": torch.ones(3), "n": torch.ones(3, dtype=torch.long)}, None
        )
    with pytest.raises(ValueError, match="num_chunks=3 must divide the batch size 8"):
        samfunc.sam_grad(quadratic, PARAMS, torch.ones(8, 2), num_chunks=3)
    with pytest.raises(ValueError, match="accum_steps=3 must divide the batch size 4"):
        samfunc.sam_grad(quadratic, PARAMS, (torch.ones(4), torch.ones(4)), accum_steps=3)
    with pytest.raises(ValueError, match="same leading size"):
        samfunc.sam_grad(quadratic, PARAMS, (torch.ones(4), torch.ones(6)), accum_steps=2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        samfunc.sam_grad_and_value(3)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="grads must have the same tree structure as params"):
        samfunc.perturbation(PARAMS, {"v": torch.ones(3)})
    with pytest.raises(ValueError, match="mask selects no leaf of params"):
        samfunc.sam_grad(quadratic, PARAMS, None, mask=lambda path, _: "norm" in path)


# --- two ways to leave parameters out of the perturbation (issue 25, item 2) ------------------


def _excluded(name: str) -> bool:
    """Biases and the LayerNorm's parameters: what one usually leaves unperturbed."""
    return name.endswith("bias") or name.startswith("1.")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def _train(model: torch.nn.Module, opt: Any, steps: int = 5) -> list[float]:
    """``steps`` SAM steps on fixed batches; returns ||e|| over the perturbed leaves of each."""
    norms = []
    for t in range(steps):
        x, y = make_batch(16, 5, 3, seed=t)
        loss_fn = torch.nn.functional.cross_entropy
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        moved = {k: p.detach() - before[k] for k, p in model.named_parameters()}
        norms.append(float(torch.sqrt(sum((v**2).sum() for k, v in moved.items()))))
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return norms


def test_a_group_with_rho_zero_equals_the_seed_and_keeps_its_gradients_in_the_norm() -> None:
    """The seed's way: the excluded group's rho is 0, but its gradients stay in ||g||."""
    ours, seeds = _model(), _model()

    def groups(model: torch.nn.Module) -> list[dict[str, Any]]:
        named = list(model.named_parameters())
        return [
            {"params": [p for k, p in named if not _excluded(k)]},
            {"params": [p for k, p in named if _excluded(k)], "rho": 0.0},
        ]

    sgd = {"lr": 0.1, "momentum": 0.9}
    norms = _train(ours, samfunc.SAM(groups(ours), torch.optim.SGD, rho=0.1, **sgd))
    _train(seeds, SeedSAM(groups(seeds), torch.optim.SGD, rho=0.1, **sgd))
    assert_trees_close(
        dict(ours.named_parameters()), dict(seeds.named_parameters()), atol=1e-14, rtol=1e-12
    )
    assert all(n < 0.1 - 1e-6 for n in norms)  # the excluded gradients shrink e: ||e|| < rho


def test_a_mask_by_name_equals_sam_over_the_selected_leaves_alone() -> None:
    """The functional way (SAM-ON's): ||e|| = rho over the perturbed leaves alone."""
    model, reference = _model(), _model()
    method = samfunc.sam(0.1, mask=lambda path, _: not _excluded(path))
    opt = samfunc.SAM(
        model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, method=method
    )
    norms = _train(model, opt)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for t in range(5):  # the same steps, written out
        x, y = make_batch(16, 5, 3, seed=t)
        named = dict(reference.named_parameters())
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(reference(x), y), list(named.values())
        )
        chosen = {k: g for (k, _), g in zip(named.items(), grads) if not _excluded(k)}
        norm = torch.sqrt(sum((g**2).sum() for g in chosen.values()))
        with torch.no_grad():
            for k, g in chosen.items():
                named[k].add_(0.1 * g / (norm + 1e-12))
        torch_opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        with torch.no_grad():
            for k, g in chosen.items():
                named[k].sub_(0.1 * g / (norm + 1e-12))
        torch_opt.step()
    assert_trees_close(
        dict(model.named_parameters()), dict(reference.named_parameters()), atol=1e-12, rtol=1e-10
    )
    assert norms == pytest.approx([0.1] * 5, rel=1e-9)
