"""The nn.Module bridge: params and buffers as pytrees, BatchNorm and dropout done right."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import samfunc

from .helpers import assert_trees_close, assert_trees_equal

F = torch.nn.functional


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()


def data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=generator, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=generator
    )


def test_running_statistics_come_from_the_unperturbed_pass_only() -> None:
    model = bn_model()
    params, buffers = samfunc.module_state(model)
    batch = data()
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
    _, (_, aux) = samfunc.sam_grad(loss_fn, params, batch, rho=0.5, has_aux=True)
    reference = copy.deepcopy(model)
    reference(batch[0])  # one forward pass at w, in training mode
    assert_trees_close(dict(reference.named_buffers()), aux.buffers, atol=1e-14, rtol=1e-12)
    assert aux.buffers["1.num_batches_tracked"].item() == 1


def test_caller_buffers_and_module_are_never_mutated() -> None:
    model = bn_model()
    params, buffers = samfunc.module_state(model)
    before = copy.deepcopy((model.state_dict(), buffers))
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
    samfunc.sam_grad(loss_fn, params, data(), has_aux=True)
    assert_trees_equal(before, (model.state_dict(), buffers))


def test_eval_mode_uses_running_statistics_and_leaves_them_alone() -> None:
    model = bn_model()
    model(data(seed=5)[0])  # give the running statistics some values
    model.eval()
    params, buffers = samfunc.module_state(model)
    x, y = data()
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
    _, (loss, aux) = samfunc.sam_grad(loss_fn, params, (x, y), has_aux=True)
    assert_trees_equal(buffers, aux.buffers)
    torch.testing.assert_close(aux.output, model(x).detach())
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item())


def test_frozen_parameters_are_neither_perturbed_nor_updated() -> None:
    model = bn_model()
    model[0].weight.requires_grad_(False)
    params, buffers = samfunc.module_state(model)
    assert "0.weight" not in params
    batch = data()
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
    grads, _ = samfunc.sam_grad(loss_fn, params, batch, rho=0.5, has_aux=True)
    assert grads.keys() == params.keys()
    # Reference: SAM by hand with the frozen weight held fixed.
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(torch.func.functional_call(model, w, (batch[0],)), batch[1])
    g = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))  # type: ignore[arg-type]
    moved = {k: w[k].detach() + 0.5 * g[k] / norm for k in w}
    moved = {k: v.requires_grad_(True) for k, v in moved.items()}
    loss2 = F.cross_entropy(torch.func.functional_call(model, moved, (batch[0],)), batch[1])
    expected = dict(zip(moved, torch.autograd.grad(loss2, list(moved.values()))))
    assert_trees_close(expected, grads, atol=1e-12, rtol=1e-10)


class TiedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.hidden = torch.nn.Linear(4, 4)
        self.decode = torch.nn.Linear(4, 7, bias=False)
        self.decode.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.hidden(self.embed(tokens))))


def test_tied_weights_appear_once_and_get_one_gradient() -> None:
    torch.manual_seed(0)
    model = TiedModel().double()
    params = samfunc.module_params(model)
    assert "embed.weight" in params and "decode.weight" not in params
    tokens, targets = torch.randint(0, 7, (10,)), torch.randint(0, 7, (10,))
    loss_fn = samfunc.module_loss(model, F.cross_entropy)
    grads, _ = samfunc.sam_grad(loss_fn, params, (tokens, targets), rho=0.0, has_aux=True)
    F.cross_entropy(model(tokens), targets).backward()  # autograd sums both uses
    torch.testing.assert_close(grads["embed.weight"], model.embed.weight.grad)


def test_module_train_step_on_tied_weights_equals_torch_optim() -> None:
    """The train step reads the ties once, when built, and still sums both uses."""
    torch.manual_seed(0)
    model = TiedModel().double()
    reference = copy.deepcopy(model)
    opt = samfunc.sgd(0.1, momentum=0.9)
    step = samfunc.make_module_train_step(model, F.cross_entropy, opt, sam=False)
    state = samfunc.init_train_state(model, opt)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for seed in range(4):
        torch.manual_seed(seed)
        batch = (torch.randint(0, 7, (10,)), torch.randint(0, 7, (10,)))
        state, _ = step(state, batch)
        torch_opt.zero_grad()
        F.cross_entropy(reference(batch[0]), batch[1]).backward()
        torch_opt.step()
    assert_trees_close(state.params, samfunc.module_params(reference))


def dropout_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    ).double()


def manual_sam(model: torch.nn.Module, params: Any, batch: Any, reseed: int | None) -> Any:
    """SAM written by hand; reseeds the RNG before the second pass if asked."""
    loss_fn = samfunc.module_loss(model, F.cross_entropy)
    g, _ = torch.func.grad(loss_fn, has_aux=True)(params, batch)
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    moved = {k: params[k] + 0.05 * g[k] / (norm + 1e-12) for k in params}
    if reseed is not None:
        torch.manual_seed(reseed)
    return torch.func.grad(loss_fn, has_aux=True)(moved, batch)[0]


@pytest.mark.parametrize("reuse_rng", [False, True])
def test_dropout_draws_new_masks_by_default_and_can_reuse_the_first(reuse_rng: bool) -> None:
    model = dropout_model()
    params = samfunc.module_params(model)
    batch = data()
    torch.manual_seed(123)
    expected = manual_sam(model, params, batch, reseed=123 if reuse_rng else None)
    after_expected = torch.rand(1)
    torch.manual_seed(123)
    loss_fn = samfunc.module_loss(model, F.cross_entropy)
    grads, _ = samfunc.sam_grad(loss_fn, params, batch, has_aux=True, reuse_rng=reuse_rng)
    assert_trees_close(expected, grads, atol=1e-12, rtol=1e-10)
    if not reuse_rng:
        assert torch.equal(torch.rand(1), after_expected)  # the stream moved on by two passes


def test_reused_rng_leaves_the_generator_after_one_pass() -> None:
    model = dropout_model()
    params, batch = samfunc.module_params(model), data()
    loss_fn = samfunc.module_loss(model, F.cross_entropy)
    torch.manual_seed(7)
    loss_fn(params, batch)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    samfunc.sam_grad(loss_fn, params, batch, has_aux=True, reuse_rng=True)
    assert torch.equal(torch.rand(1), expected_next)


def test_accumulation_with_batchnorm_averages_running_statistics() -> None:
    model = bn_model()
    params, buffers = samfunc.module_state(model)
    batch = data(16)
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
    _, (_, aux) = samfunc.sam_grad(loss_fn, params, batch, has_aux=True, accum_steps=4)
    merged = samfunc.mean_over_parts(aux.buffers)
    reference = copy.deepcopy(model)
    reference(batch[0])
    torch.testing.assert_close(merged["1.running_mean"], reference[1].running_mean)
    assert merged["1.num_batches_tracked"].item() == 1


def test_m_sharpness_with_batchnorm_runs_as_a_loop() -> None:
    model = bn_model()
    params, buffers = samfunc.module_state(model)
    x, y = data(16)
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
    grads, (loss, aux) = samfunc.sam_grad(
        loss_fn, params, (x, y), has_aux=True, num_chunks=2, vectorize_chunks=False
    )
    halves = [
        samfunc.sam_grad(loss_fn, params, (x[i : i + 8], y[i : i + 8]), has_aux=True)
        for i in (0, 8)
    ]
    expected = {k: (halves[0][0][k] + halves[1][0][k]) / 2 for k in params}
    assert_trees_close(expected, grads, atol=1e-12, rtol=1e-10)
    assert aux.buffers["1.running_mean"].shape == (2, 8)
    assert loss.item() == pytest.approx((halves[0][1][0].item() + halves[1][1][0].item()) / 2)


def test_load_into_module_round_trips() -> None:
    model = bn_model()
    params, buffers = samfunc.module_state(model)
    new_params = {k: v + 1 for k, v in params.items()}
    new_buffers = {k: v + 1 for k, v in buffers.items()}
    samfunc.load_into_module(model, new_params, new_buffers)
    assert_trees_equal(new_params, samfunc.module_params(model))
    assert_trees_equal(new_buffers, samfunc.module_buffers(model))
    with pytest.raises(KeyError, match="'nope', which is not a parameter of the module"):
        samfunc.load_into_module(model, {"nope": torch.ones(1)})


def test_module_loss_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module, got function"):
        samfunc.module_loss(lambda x: x, F.cross_entropy)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="criterion must be callable"):
        samfunc.module_loss(bn_model(), None)  # type: ignore[arg-type]
    loss_fn = samfunc.module_loss(bn_model(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"batch must be an \(inputs, targets\) pair, got Tensor"):
        loss_fn(samfunc.module_params(bn_model()), torch.ones(3))


def test_multiple_inputs_are_passed_as_positional_arguments() -> None:
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 3), torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(z)

    model = TwoInputs()
    x, z, y = torch.randn(5, 2), torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss_fn = samfunc.module_loss(model, F.cross_entropy)
    loss, aux = loss_fn(samfunc.module_params(model), ((x, z), y))
    torch.testing.assert_close(aux.output, model(x, z).detach())
    assert loss.item() == pytest.approx(F.cross_entropy(model(x, z), y).item())


def _direct_and_functional_call(model: torch.nn.Module, batch: Any) -> tuple[Any, Any]:
    params, buffers = samfunc.module_state(model)
    direct = samfunc.module_loss(model, F.cross_entropy, buffers, tie_weights=False)
    through = samfunc.module_loss(model, F.cross_entropy, buffers, tie_weights=True)
    return samfunc.sam_grad(direct, params, batch, has_aux=True), samfunc.sam_grad(
        through, params, batch, has_aux=True
    )


def test_direct_swap_equals_functional_call_and_puts_the_module_back() -> None:
    model = bn_model()
    own = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()]}
    batch = data()
    (grads, (loss, aux)), (grads_fc, (loss_fc, aux_fc)) = _direct_and_functional_call(model, batch)
    assert_trees_equal(grads, grads_fc)
    assert torch.equal(loss, loss_fc)
    assert_trees_equal(aux.buffers, aux_fc.buffers)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(after[k] is v for k, v in own.items())  # the very same tensors, back in place
    model.eval()
    (grads, (loss, _)), (grads_fc, (loss_fc, _)) = _direct_and_functional_call(model, batch)
    assert_trees_equal(grads, grads_fc)


def test_direct_swap_puts_the_module_back_when_the_forward_raises() -> None:
    model = bn_model()
    own = dict(model.named_parameters())
    params, buffers = samfunc.module_state(model)
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers, tie_weights=False)
    with pytest.raises(RuntimeError):
        loss_fn(params, (torch.randn(4, 7, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))
    assert all(dict(model.named_parameters())[k] is v for k, v in own.items())


def test_direct_swap_leaves_unknown_names_to_functional_call() -> None:
    model = bn_model()
    params, buffers = samfunc.module_state(model)
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers, tie_weights=False)
    with pytest.raises(Exception, match=r"nothere|no attribute"):
        loss_fn({**params, "nothere.weight": torch.ones(1)}, data())
