"""Sharpness tools against quadratics with a known spectrum."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc

DTYPE = torch.float64


def quadratic(params: Any, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * params["w"] @ a @ params["w"]


def spd_with_spectrum(eigenvalues: list[float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=DTYPE)
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ q.T


spectra = st.lists(st.floats(0.1, 10.0), min_size=2, max_size=6)


@given(eigenvalues=spectra, seed=st.integers(0, 100))
def test_hessian_vector_product_is_a_times_v(eigenvalues: list[float], seed: int) -> None:
    a = spd_with_spectrum(eigenvalues, seed)
    w, v = torch.randn(len(eigenvalues), dtype=DTYPE), torch.randn(len(eigenvalues), dtype=DTYPE)
    hv = samfunc.hessian_vector_product(quadratic, {"w": w}, a, {"w": v})
    torch.testing.assert_close(hv["w"], a @ v)


@given(eigenvalues=spectra, seed=st.integers(0, 100))
def test_power_iteration_finds_the_top_eigenvalue(eigenvalues: list[float], seed: int) -> None:
    top = max(eigenvalues)
    if sum(abs(e - top) < 0.05 * top for e in eigenvalues) > 1:
        eigenvalues = [e if abs(e - top) >= 0.05 * top else e * 0.5 for e in eigenvalues] + [top]
    a = spd_with_spectrum(eigenvalues, seed)
    value, vector = samfunc.top_hessian_eigenvalue(
        quadratic, {"w": torch.zeros(len(eigenvalues), dtype=DTYPE)}, a, iters=500, tol=1e-12
    )
    assert value.item() == pytest.approx(max(eigenvalues), rel=1e-6)
    residual = a @ vector["w"] - value * vector["w"]
    assert residual.norm().item() < 1e-3 * max(eigenvalues)


def residual_norm(a: torch.Tensor, value: torch.Tensor, vector: torch.Tensor) -> float:
    """||A v - lambda v||, from the dense matrix."""
    return (a @ vector - value * vector).norm().item()


# The two eigenvalues of largest magnitude are nearly opposite, so power iteration
# converges at the rate 3 / 3.05 per step; the old rule (stop when the estimate moves
# by less than tol) stopped at about -2.06, which is not an eigenvalue.
NEARLY_OPPOSITE = [-3.0, 3.05]


@pytest.mark.parametrize(
    ("eigenvalues", "rotation_seed"),
    [(NEARLY_OPPOSITE, None), (NEARLY_OPPOSITE, 4), ([*NEARLY_OPPOSITE, 1.0, -0.5], 7)],
)
def test_power_iteration_converges_on_nearly_opposite_eigenvalues(
    eigenvalues: list[float], rotation_seed: int | None
) -> None:
    if rotation_seed is None:
        a = torch.diag(torch.tensor(eigenvalues, dtype=DTYPE))
    else:
        a = spd_with_spectrum(eigenvalues, rotation_seed)
    params = {"w": torch.zeros(len(eigenvalues), dtype=DTYPE)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        value, vector = samfunc.top_hessian_eigenvalue(quadratic, params, a, iters=3000)
    assert value.dtype == DTYPE and value.ndim == 0
    # |lambda - 3.05| <= ||A v - lambda v|| <= tol * |lambda| for a symmetric A.
    assert abs(value.item() - 3.05) <= 1e-4 * 3.05
    assert residual_norm(a, value, vector["w"]) <= 1e-4 * abs(value.item())
    assert vector["w"].norm().item() == pytest.approx(1.0)
    eigenvalues_a, eigenvectors = torch.linalg.eigh(a)
    top = eigenvectors[:, int(torch.argmax(eigenvalues_a))]
    assert abs(torch.dot(top, vector["w"]).item()) == pytest.approx(1.0, abs=1e-6)


def test_power_iteration_warns_instead_of_returning_a_non_eigenvalue_silently() -> None:
    """Fails on the old stopping rule, which returned about -2.06 without a word."""
    a = torch.diag(torch.tensor(NEARLY_OPPOSITE, dtype=DTYPE))
    params = {"w": torch.zeros(2, dtype=DTYPE)}
    with pytest.warns(RuntimeWarning, match="did not converge in 50 iterations") as record:
        value, vector = samfunc.top_hessian_eigenvalue(quadratic, params, a, iters=50)
    # The last estimate comes back, with the type promised: a float64 0-d tensor and a
    # unit-norm tree like params.
    assert value.dtype == DTYPE and value.ndim == 0
    assert set(vector) == {"w"} and vector["w"].shape == (2,)
    assert vector["w"].norm().item() == pytest.approx(1.0)
    assert min(abs(value.item() - e) for e in NEARLY_OPPOSITE) > 0.5
    # The residual in the message is the returned pair's, and it is far above tol.
    message = str(record[0].message)
    found = re.search(r"\|\|Hv - lambda v\|\| = (\S+) is above", message)
    assert found is not None, message
    reported = float(found.group(1))
    assert reported == pytest.approx(residual_norm(a, value, vector["w"]), rel=1e-2)
    assert reported > 1e-4 * abs(value.item())


@given(
    eigenvalues=st.lists(st.floats(-10.0, 10.0), min_size=2, max_size=5),
    seed=st.integers(0, 100),
    iters=st.integers(1, 40),
    tol=st.sampled_from([1e-2, 1e-3, 1e-4]),
)
def test_an_estimate_returned_without_a_warning_is_an_eigenpair(
    eigenvalues: list[float], seed: int, iters: int, tol: float
) -> None:
    a = spd_with_spectrum(eigenvalues, seed)
    params = {"w": torch.zeros(len(eigenvalues), dtype=DTYPE)}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", RuntimeWarning)
        value, vector = samfunc.top_hessian_eigenvalue(
            quadratic, params, a, iters=iters, tol=tol, seed=seed
        )
    warned = [w for w in record if issubclass(w.category, RuntimeWarning)]
    residual = residual_norm(a, value, vector["w"])
    if warned:
        assert f"did not converge in {iters} iterations" in str(warned[0].message)
    else:
        assert residual <= tol * abs(value.item()) * (1 + 1e-9) + 1e-12
        # Then lambda is within the residual of an eigenvalue of A.
        assert min(abs(value.item() - e) for e in eigenvalues) <= residual + 1e-9


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 3.5], dtype=DTYPE))
    estimate = samfunc.hessian_trace(quadratic, {"w": torch.ones(3, dtype=DTYPE)}, a, samples=5)
    assert estimate.trace.item() == pytest.approx(6.5)
    assert estimate.standard_error.item() == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_trace_is_unbiased_for_a_dense_hessian() -> None:
    a = spd_with_spectrum([0.5, 1.0, 2.0, 4.0, 8.0], seed=3)
    estimate = samfunc.hessian_trace(quadratic, {"w": torch.ones(5, dtype=DTYPE)}, a, samples=2000)
    assert abs(estimate.trace.item() - 15.5) < 4 * estimate.standard_error.item()
    assert estimate.standard_error.item() < 0.5


@given(rho=st.floats(0.01, 2.0), scale=st.floats(0.1, 3.0), eigenvalues=spectra)
def test_one_ascent_step_finds_the_analytic_worst_case_for_an_eigenvector(
    rho: float, scale: float, eigenvalues: list[float]
) -> None:
    """A = diag(l), w = s e_1 (top direction): max over ||e|| <= rho is 1/2 l_1 (s + rho)^2."""
    ordered = sorted(eigenvalues, reverse=True)
    a = torch.diag(torch.tensor(ordered, dtype=DTYPE))
    w = torch.zeros(len(ordered), dtype=DTYPE)
    w[0] = scale
    result = samfunc.worst_case_loss(quadratic, {"w": w}, a, rho)
    assert result.loss.item() == pytest.approx(0.5 * ordered[0] * scale**2)
    assert result.worst_loss.item() == pytest.approx(0.5 * ordered[0] * (scale + rho) ** 2)
    assert result.sharpness.item() == pytest.approx(result.worst_loss.item() - result.loss.item())


def test_more_ascent_steps_never_find_less() -> None:
    a = spd_with_spectrum([0.2, 1.0, 5.0], seed=1)
    params = {"w": torch.tensor([1.0, -0.5, 0.25], dtype=DTYPE)}
    one = samfunc.worst_case_loss(quadratic, params, a, 0.5).worst_loss.item()
    many = samfunc.worst_case_loss(
        quadratic, params, a, 0.5, steps=10, step_size=0.1
    ).worst_loss.item()
    assert many >= one - 1e-12
    # Nothing in the ball is worse than the bound 1/2 l_max (||w|| + rho)^2.
    assert many <= 0.5 * 5.0 * (params["w"].norm().item() + 0.5) ** 2


def test_m_sharpness_averages_over_chunks() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, dtype=DTYPE), torch.randn(8, dtype=DTYPE)

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return ((xb @ p["w"] - yb) ** 2).mean()

    params = {"w": torch.zeros(3, dtype=DTYPE)}
    chunked = samfunc.worst_case_loss(loss_fn, params, (x, y), 0.1, num_chunks=2)
    halves = [
        samfunc.worst_case_loss(loss_fn, params, (x[i : i + 4], y[i : i + 4]), 0.1) for i in (0, 4)
    ]
    assert chunked.worst_loss.item() == pytest.approx(sum(h.worst_loss.item() for h in halves) / 2)


def test_filter_normalized_direction_matches_each_filter_norm() -> None:
    params = {"conv": torch.randn(4, 3, 2, 2), "bias": torch.randn(4)}
    direction = samfunc.random_direction(params, seed=1)
    torch.testing.assert_close(
        direction["conv"].reshape(4, -1).norm(dim=1), params["conv"].reshape(4, -1).norm(dim=1)
    )
    assert torch.equal(direction["bias"], torch.zeros(4))
    kept = samfunc.random_direction(params, seed=1, ignore_1d=False)
    assert kept["bias"].norm().item() == pytest.approx(params["bias"].norm().item(), rel=1e-5)


def test_landscape_slices_match_the_quadratic() -> None:
    a = spd_with_spectrum([1.0, 3.0], seed=0)
    w = torch.tensor([0.5, -1.0], dtype=DTYPE)
    d1, d2 = torch.tensor([1.0, 0.0], dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE)
    alphas = torch.linspace(-1, 1, 5)
    line = samfunc.loss_landscape_1d(quadratic, {"w": w}, a, {"w": d1}, alphas)
    expected = torch.stack([0.5 * (w + t * d1) @ a @ (w + t * d1) for t in alphas.double()])
    torch.testing.assert_close(line, expected)
    grid = samfunc.loss_landscape_2d(
        quadratic, {"w": w}, a, ({"w": d1}, {"w": d2}), alphas, alphas[:3]
    )
    assert grid.shape == (5, 3)
    point = w + alphas[4].double() * d1 + alphas[2].double() * d2
    assert grid[4, 2].item() == pytest.approx((0.5 * point @ a @ point).item())


# Five iterations do not converge on this Hessian; the test is about has_aux only.
@pytest.mark.filterwarnings("ignore:top_hessian_eigenvalue did not converge:RuntimeWarning")
def test_tools_accept_loss_functions_with_aux() -> None:
    model = (
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        .double()
        .eval()
    )
    params = samfunc.module_params(model)
    batch = (torch.randn(6, 3, dtype=DTYPE), torch.tensor([0, 1, 0, 1, 1, 0]))
    loss_fn = samfunc.module_loss(model, torch.nn.functional.cross_entropy)
    value, _ = samfunc.top_hessian_eigenvalue(loss_fn, params, batch, has_aux=True, iters=5)
    assert torch.isfinite(value)
    assert samfunc.worst_case_loss(loss_fn, params, batch, 0.05, has_aux=True).sharpness.item() >= 0
    samfunc.hessian_trace(loss_fn, params, batch, samples=2, has_aux=True)
    samfunc.loss_landscape_1d(
        loss_fn, params, batch, samfunc.random_direction(params), [0.0, 1.0], has_aux=True
    )


def test_bad_arguments_name_themselves() -> None:
    params = {"w": torch.ones(2, dtype=DTYPE)}
    a = torch.eye(2, dtype=DTYPE)
    with pytest.raises(ValueError, match="rho must be >= 0"):
        samfunc.worst_case_loss(quadratic, params, a, -1.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        samfunc.worst_case_loss(quadratic, params, a, 0.1, steps=0)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        samfunc.hessian_trace(quadratic, params, a, samples=0)
    with pytest.raises(ValueError, match="vector must have the same tree structure as params"):
        samfunc.hessian_vector_product(quadratic, params, a, {"v": torch.ones(2)})
