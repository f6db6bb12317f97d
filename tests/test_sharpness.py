"""Sharpness tools against quadratics with a known spectrum."""

from __future__ import annotations

import re
import warnings
from copy import deepcopy
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


# --- module_sharpness_loss: a model with BatchNorm and Dropout, against functional_call by hand ---

F = torch.nn.functional


def _bn_dropout_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(8, 6),
        torch.nn.BatchNorm1d(6, momentum=None),  # a cumulative average: num_batches_tracked counts
        torch.nn.Tanh(),
        torch.nn.Linear(6, 3),
    ).double()
    with torch.no_grad():  # running statistics far from their start, as after training
        for _ in range(3):
            model(torch.randn(8, 5, dtype=DTYPE) * 2 + 1)
    return model


_BN_DROPOUT_MLP = _bn_dropout_mlp()


def bn_dropout_mlp() -> torch.nn.Module:
    """A small MLP with BatchNorm and Dropout (float64, training mode, running stats moved)."""
    return deepcopy(_BN_DROPOUT_MLP).train()


def inputs_batch(seed: int, size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 5, generator=generator, dtype=DTYPE)
    return x, torch.randint(0, 3, (size,), generator=generator)


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Every parameter and buffer (num_batches_tracked too), copied, and every module's mode."""
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return state, [module.training for module in model.modules()]


def assert_unchanged(model: torch.nn.Module, before: Any) -> None:
    state, modes = snapshot(model)
    assert modes == before[1]
    assert state.keys() == before[0].keys()
    for name, value in state.items():
        assert torch.equal(value, before[0][name]), name


def hand_written_loss(model: torch.nn.Module, train: bool = False) -> Any:
    """The reference: functional_call on a copy of the model, put in its mode by hand."""
    copy = deepcopy(model).train(train)

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        buffers = {name: b.clone() for name, b in copy.named_buffers()}
        return F.cross_entropy(torch.func.functional_call(copy, (params, buffers), (x,)), y)

    return loss_fn


def own_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:top_hessian_eigenvalue did not converge:RuntimeWarning")
def test_module_entry_gives_every_tool_the_hand_written_eval_mode_numbers() -> None:
    model = bn_dropout_mlp().train()
    before = snapshot(model)
    batch = inputs_batch(1)
    loss_fn, params = samfunc.module_sharpness_loss(model, F.cross_entropy)
    reference, ref_params = hand_written_loss(model), own_params(model)
    assert params.keys() == ref_params.keys()

    def both(tool: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return tool(loss_fn, params, batch, *args, **kwargs), tool(
            reference, ref_params, batch, *args, **kwargs
        )

    torch.testing.assert_close(loss_fn(params, batch), reference(ref_params, batch))
    torch.testing.assert_close(*both(samfunc.worst_case_loss, 0.1, steps=2))
    torch.testing.assert_close(*both(samfunc.top_hessian_eigenvalue, iters=3))
    torch.testing.assert_close(*both(samfunc.hessian_trace, samples=2))
    direction = samfunc.random_direction(params, seed=3)
    torch.testing.assert_close(*both(samfunc.hessian_vector_product, direction))
    alphas = [-0.5, 0.5]
    torch.testing.assert_close(*both(samfunc.loss_landscape_1d, direction, alphas))
    second = samfunc.random_direction(params, seed=4)
    torch.testing.assert_close(
        *both(samfunc.loss_landscape_2d, (direction, second), alphas, alphas)
    )
    # Eval mode: dropout is off, so the numbers repeat.
    assert torch.equal(loss_fn(params, batch), loss_fn(params, batch))
    assert_unchanged(model, before)
    assert model.training


@given(
    seed=st.integers(0, 2**16),
    size=st.integers(2, 12),
    rho=st.floats(0.0, 0.5),
    modes=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_module_entry_matches_the_reference_and_leaves_the_model_as_it_was(
    seed: int, size: int, rho: float, modes: list[bool]
) -> None:
    model = bn_dropout_mlp()
    for module, mode in zip(model, modes):  # any mix of train and eval submodules
        module.training = mode
    before = snapshot(model)
    batch = inputs_batch(seed, size)
    loss_fn, params = samfunc.module_sharpness_loss(model, F.cross_entropy)
    got = samfunc.worst_case_loss(loss_fn, params, batch, rho)
    expected = samfunc.worst_case_loss(hand_written_loss(model), own_params(model), batch, rho)
    torch.testing.assert_close(got, expected)
    assert_unchanged(model, before)


def test_train_mode_uses_batch_statistics_and_dropout_and_still_changes_nothing() -> None:
    model = bn_dropout_mlp().eval()
    before = snapshot(model)
    batch = inputs_batch(2)
    loss_fn, params = samfunc.module_sharpness_loss(model, F.cross_entropy, train=True)
    reference = hand_written_loss(model, train=True)
    torch.manual_seed(5)
    got = loss_fn(params, batch)
    torch.manual_seed(5)
    torch.testing.assert_close(got, reference(own_params(model), batch))
    eval_loss, _ = samfunc.module_sharpness_loss(model, F.cross_entropy)
    assert not torch.allclose(got, eval_loss(params, batch))  # batch statistics, not running
    assert not torch.equal(loss_fn(params, batch), loss_fn(params, batch))  # dropout is on
    # BatchNorm in training mode writes running statistics, here into copies only,
    # also under the tools' function transforms (grad, and jvp of grad).
    samfunc.worst_case_loss(loss_fn, params, batch, 0.1)
    samfunc.hessian_trace(loss_fn, params, batch, samples=2)
    samfunc.loss_landscape_1d(loss_fn, params, batch, params, [0.0, 0.1])
    assert_unchanged(model, before)
    assert not model.training


def test_train_none_keeps_each_submodules_mode() -> None:
    model = bn_dropout_mlp().train()
    model[1].eval()  # BatchNorm frozen during fine-tuning; Dropout still on
    model[3].p = 0.0  # no randomness, to compare numbers
    before = snapshot(model)
    batch = inputs_batch(3)
    loss_fn, params = samfunc.module_sharpness_loss(model, F.cross_entropy, train=None)
    reference = deepcopy(model)
    expected = F.cross_entropy(reference(batch[0]), batch[1])
    torch.testing.assert_close(loss_fn(params, batch), expected)
    reference_buffers = dict(reference.named_buffers())
    assert not torch.equal(reference_buffers["5.running_mean"], model[5].running_mean)
    assert torch.equal(reference_buffers["1.running_mean"], model[1].running_mean)
    assert_unchanged(model, before)


def test_the_mode_is_restored_when_the_forward_pass_raises() -> None:
    model = bn_dropout_mlp().train()
    model[5].eval()
    before = snapshot(model)

    def failing(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert not any(m.training for m in model.modules())  # measured in eval mode
        raise RuntimeError("criterion failed")

    loss_fn, params = samfunc.module_sharpness_loss(model, failing)
    with pytest.raises(RuntimeError, match="criterion failed"):
        samfunc.hessian_trace(loss_fn, params, inputs_batch(0), samples=1)
    assert_unchanged(model, before)
    loss_fn, params = samfunc.module_sharpness_loss(model, F.cross_entropy, train=True)
    with pytest.raises(RuntimeError):  # a wrong input shape fails inside the model
        loss_fn(params, (torch.randn(4, 2, dtype=DTYPE), torch.zeros(4, dtype=torch.long)))
    assert_unchanged(model, before)


def test_buffers_from_a_train_state_replace_the_models() -> None:
    model = bn_dropout_mlp()
    trained = deepcopy(model)
    with torch.no_grad():
        trained(torch.randn(8, 5, dtype=DTYPE) * 3 - 2)  # other running statistics
    buffers = samfunc.module_buffers(trained)
    before = snapshot(model)
    batch = inputs_batch(4)
    loss_fn, params = samfunc.module_sharpness_loss(model, F.cross_entropy, buffers)
    torch.testing.assert_close(loss_fn(params, batch), hand_written_loss(trained)(params, batch))
    # A buffer left out is the model's own.
    partial = {k: v for k, v in buffers.items() if k.startswith("1.")}
    loss_fn, _ = samfunc.module_sharpness_loss(model, F.cross_entropy, partial, train=True)
    samfunc.hessian_trace(loss_fn, params, batch, samples=1)
    assert_unchanged(model, before)
    assert all(torch.equal(b, buffers[k]) for k, b in samfunc.module_buffers(trained).items())


def test_module_entry_bad_arguments_name_themselves() -> None:
    model = bn_dropout_mlp()
    entry = samfunc.module_sharpness_loss
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got list"):
        entry([model], F.cross_entropy)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="criterion must be callable, got str"):
        entry(model, "cross_entropy")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="train must be True, False or None, got 'eval'"):
        entry(model, F.cross_entropy, train="eval")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="train must be True, False or None, got 1"):
        entry(model, F.cross_entropy, train=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"buffers must be a dict of tensors .* got list"):
        entry(model, F.cross_entropy, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"buffers has 'bn\.running_mean', which is not a buffer"):
        entry(model, F.cross_entropy, {"bn.running_mean": torch.zeros(3)})
    with pytest.raises(
        TypeError, match=r"buffers\['1\.running_mean'\] must be a tensor, got float"
    ):
        entry(model, F.cross_entropy, {"1.running_mean": 0.0})  # type: ignore[dict-item]
    loss_fn, params = entry(model, F.cross_entropy)
    with pytest.raises(ValueError, match="batch must be an \\(inputs, targets\\) pair, got Tensor"):
        loss_fn(params, torch.randn(4, 5, dtype=DTYPE))
