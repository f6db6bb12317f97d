"""One interpreter: every method runs the same in every driver (issue 21).

The drivers are ``method.grad`` in a hand-written loop, ``make_train_step``,
``make_module_train_step`` and ``samfunc.SAM``. Each test calls them the way
users do: loops of several steps, closures, a skipped step, resumed runs.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import samfunc
from samfunc import _tree
from tests.helpers import assert_trees_close, assert_trees_equal

DTYPE = torch.float64
LR, MOMENTUM = 0.1, 0.9
STEPS = 6
SKIPPED = 2  # the step whose batch holds a NaN


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(
        DTYPE
    )


def make_batches(nan_at: int | None = SKIPPED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for index in range(STEPS):
        x = torch.randn(8, 4, generator=generator, dtype=DTYPE)
        if index == nan_at:
            x = x.clone().fill_(float("nan"))
        batches.append((x, torch.randint(0, 3, (8,), generator=generator)))
    return batches


METHODS: dict[str, Callable[[], samfunc.Method]] = {
    "sam": lambda: samfunc.sam(0.1),
    "asam": lambda: samfunc.sam(0.5, adaptive=True, eta=0.01),
    "sam_schedule": lambda: samfunc.sam(samfunc.linear_schedule(0.2, 0.0, STEPS)),
    "gsam": lambda: samfunc.gsam(0.1, alpha=0.3),
    "friendly_sam": lambda: samfunc.friendly_sam(0.1),
    "vasso": lambda: samfunc.vasso(0.1, theta=0.5),
    "wsam": lambda: samfunc.wsam(0.1, gamma=0.7),
    "esam": lambda: samfunc.esam(0.1, beta=0.6, gamma=1.0, seed=3),
    "looksam": lambda: samfunc.looksam(0.1, k=2),
    "ae_sam": lambda: samfunc.ae_sam(0.1, c=0.0),
    "every_2": lambda: samfunc.with_policy(
        samfunc.sam(samfunc.linear_schedule(0.2, 0.0, STEPS)), samfunc.every_n_steps(2)
    ),
    "momentum_sam": lambda: samfunc.momentum_sam(0.3, momentum=MOMENTUM),
}


def per_sample(name: str) -> bool:
    return name == "esam"


def criterion(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    reduction = "none" if per_sample(name) else "mean"
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


def functional_loop(name: str, batches: list[Any]) -> Any:
    """The reference: ``method.grad`` in a loop; a non-finite gradient skips the step."""
    model = make_model()
    method = METHODS[name]()
    loss_of = criterion(name)

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        return loss_of(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    params = samfunc.module_params(model)
    opt = samfunc.sgd(LR, momentum=MOMENTUM)
    opt_state, state = opt.init(params), method.init(params)
    for batch in batches:
        grads, _, new_state = method.grad(loss_fn, params, batch, state)
        if not bool(torch.isfinite(_tree.global_norm(grads))):
            continue
        updates, opt_state = opt.update(grads, opt_state, params)
        params, state = samfunc.apply_updates(params, updates), new_state
    return params, state


def train_step_run(name: str, batches: list[Any], module: bool, compiled: bool = False) -> Any:
    model = make_model()
    method = METHODS[name]()
    opt = samfunc.sgd(LR, momentum=MOMENTUM)
    if module:
        step = samfunc.make_module_train_step(model, criterion(name), opt, method=method)
        state = samfunc.init_train_state(model, opt, method=method)
    else:
        loss_of = criterion(name)

        def loss_fn(params: Any, batch: Any) -> torch.Tensor:
            return loss_of(torch.func.functional_call(model, params, (batch[0],)), batch[1])

        step = samfunc.make_train_step(loss_fn, opt, method=method)
        state = samfunc.init_train_state(samfunc.module_params(model), opt, method=method)
    if compiled:
        step = samfunc.compile_step(step, fullgraph=True)
    for batch in batches:
        state, _ = step(state, batch)
    return state.params, state.method_state, state.step


def closure_of(model: torch.nn.Module, opt: Any, batch: Any) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return closure


def class_run(name: str, batches: list[Any]) -> Any:
    model = make_model()
    opt = samfunc.SAM(
        model.named_parameters(),
        torch.optim.SGD,
        method=METHODS[name](),
        nonfinite="skip",
        lr=LR,
        momentum=MOMENTUM,
    )
    for batch in batches:
        opt.step(closure_of(model, opt, batch))
    return samfunc.module_params(model), opt.method_state, opt.skipped_steps


@pytest.mark.parametrize("name", list(METHODS))
def test_every_driver_runs_every_method_the_same(name: str) -> None:
    batches = make_batches()
    params, state = functional_loop(name, batches)
    assert int(state.steps) == STEPS - 1  # the skipped step advanced no clock
    for module in (False, True):
        step_params, step_state, step = train_step_run(name, batches, module)
        assert_trees_equal(params, step_params)
        assert_trees_equal(state, step_state)
        assert int(step) == STEPS - 1
    class_params, class_state, skipped = class_run(name, batches)
    # torch.optim.SGD rounds its update differently from samfunc.sgd in the last bit
    assert_trees_close(params, class_params, atol=1e-13, rtol=1e-11)
    assert int(class_state.steps) == STEPS - 1 and skipped == 1
    assert int(class_state.full_steps) == int(state.full_steps)


@pytest.mark.parametrize("name", ["sam_schedule", "looksam", "ae_sam"])
def test_compiled_steps_run_the_same(name: str) -> None:
    torch._dynamo.reset()
    batches = make_batches()
    eager = train_step_run(name, batches, module=True)
    compiled = train_step_run(name, batches, module=True, compiled=True)
    assert_trees_close(eager[0], compiled[0], atol=1e-12, rtol=1e-10)
    assert int(compiled[1].steps) == int(eager[1].steps) == STEPS - 1


@pytest.mark.parametrize("name", ["sam", "gsam", "looksam"])
def test_accumulation_runs_the_same_in_both_train_steps(name: str) -> None:
    batches = make_batches(nan_at=None)
    model = make_model()
    method = METHODS[name]()
    opt = samfunc.sgd(LR)
    whole = samfunc.make_module_train_step(model, criterion(name), opt, method=method)
    parts = samfunc.make_module_train_step(
        model, criterion(name), opt, method=method, accum_steps=2
    )
    state_whole = state_parts = samfunc.init_train_state(model, opt, method=method)
    for batch in batches:
        state_whole, _ = whole(state_whole, batch)
        state_parts, _ = parts(state_parts, batch)
    assert_trees_close(state_whole.params, state_parts.params, atol=1e-13, rtol=1e-11)


# --- item 1: reuse_rng in every driver, accumulation and AE-SAM included ------------------------


class DropoutNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
        ).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def dropout_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(8, 4, generator=generator, dtype=DTYPE), torch.randint(
        0, 3, (8,), generator=generator
    )


@pytest.mark.parametrize(
    ("method", "accum_steps"),
    [
        (lambda: samfunc.sam(0.0), 1),
        (lambda: samfunc.sam(0.0), 2),
        (lambda: samfunc.ae_sam(0.0, c=-1e9), 2),
    ],
    ids=["sam", "sam-accum", "ae_sam-accum"],
)
def test_reuse_rng_replays_the_dropout_masks_in_every_functional_driver(
    method: Callable[[], samfunc.Method], accum_steps: int
) -> None:
    # rho = 0 puts the second pass at w: with the first pass's masks replayed (per
    # micro-batch), its gradient is the first pass's, bit for bit.
    model = DropoutNet()
    batch = dropout_batch()
    loss_fn = samfunc.module_loss(model, F.cross_entropy)
    params = samfunc.module_params(model)

    def plain(seed: int) -> Any:
        torch.manual_seed(seed)
        parts = samfunc.with_policy(samfunc.sam(0.0), samfunc.from_step(10**9))
        grads, _, _ = parts.grad(
            loss_fn, params, batch, parts.init(params), has_aux=True, accum_steps=accum_steps
        )
        return grads

    m = method()
    torch.manual_seed(5)
    grads, _, _ = m.grad(
        loss_fn,
        params,
        batch,
        m.init(params),
        has_aux=True,
        accum_steps=accum_steps,
        reuse_rng=True,
    )
    assert_trees_equal(plain(5), grads)
    torch.manual_seed(5)
    different, _, _ = m.grad(
        loss_fn, params, batch, m.init(params), has_aux=True, accum_steps=accum_steps
    )
    assert not all(torch.equal(a, b) for a, b in zip(_tree.leaves(grads), _tree.leaves(different)))

    opt = samfunc.sgd(LR)
    step = samfunc.make_module_train_step(
        model, F.cross_entropy, opt, method=m, accum_steps=accum_steps, reuse_rng=True
    )
    torch.manual_seed(5)
    state, _ = step(samfunc.init_train_state(model, opt, method=m), batch)
    expected = samfunc.apply_updates(params, opt.update(plain(5), opt.init(params), params)[0])
    assert_trees_equal(expected, state.params)


def test_reuse_rng_in_the_class_replays_the_dropout_masks() -> None:
    batch = dropout_batch()

    def run(optimizer: Callable[[Any], torch.optim.Optimizer]) -> Any:
        model = DropoutNet()
        opt = optimizer(model)
        torch.manual_seed(7)
        for _ in range(3):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(batch[0]), batch[1])
                loss.backward()
                return loss

            opt.step(closure)
        return samfunc.module_params(model)

    sgd = run(lambda m: torch.optim.SGD(m.parameters(), lr=LR))
    replayed = run(
        lambda m: samfunc.SAM(m.parameters(), torch.optim.SGD, rho=0.0, reuse_rng=True, lr=LR)
    )
    assert_trees_equal(sgd, replayed)
    fresh = run(lambda m: samfunc.SAM(m.parameters(), torch.optim.SGD, rho=0.0, lr=LR))
    assert not all(torch.equal(a, b) for a, b in zip(_tree.leaves(sgd), _tree.leaves(fresh)))


# --- item 2: a parameter without a gradient is left alone -------------------------------------


@pytest.mark.parametrize(
    "method", [None, samfunc.sam(0.1), samfunc.gsam(0.1), samfunc.looksam(0.1, k=2)]
)
def test_a_parameter_without_a_gradient_is_left_alone(method: Any) -> None:
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})
    before = {k: v.detach().clone() for k, v in model["unused"].state_dict().items()}
    extra = {} if method is None else {"method": method}
    opt = samfunc.SAM(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1, **extra
    )
    for _ in range(4):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = model["used"](torch.ones(4, 3)).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        assert model["unused"].weight.grad is None
    for key, value in model["unused"].state_dict().items():
        assert torch.equal(value, before[key])


# --- item 3: one clock -----------------------------------------------------------------------


def test_a_rho_schedule_under_a_policy_follows_the_updates_applied() -> None:
    # Reference: step t is full when t is even, with rho = schedule(t).
    schedule = samfunc.linear_schedule(0.3, 0.0, STEPS)
    batches = make_batches(nan_at=None)
    model = make_model()

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    params = samfunc.module_params(model)
    opt = samfunc.sgd(LR)
    opt_state = opt.init(params)
    for t, batch in enumerate(batches):
        if t % 2 == 0:
            grads, _ = samfunc.sam_grad(
                loss_fn, params, batch, rho=float(schedule(torch.tensor(t)))
            )
        else:
            grads = torch.func.grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = samfunc.apply_updates(params, updates)
    method = samfunc.with_policy(samfunc.sam(schedule), samfunc.every_n_steps(2))
    step = samfunc.make_train_step(loss_fn, opt, method=method)
    state = samfunc.init_train_state(samfunc.module_params(model), opt, method=method)
    radii = []
    for batch in batches:
        state, metrics = step(state, batch)
        radii.append(float(metrics.rho))
    assert_trees_close(params, state.params, atol=1e-14, rtol=1e-12)
    assert radii[::2] == [float(schedule(torch.tensor(t))) for t in range(0, STEPS, 2)]
    assert samfunc.full_step_fraction(state) == 0.5


def test_rho_shortcut_builds_exactly_the_method_and_a_skip_advances_nothing() -> None:
    schedule = samfunc.linear_schedule(0.2, 0.0, STEPS)
    batches = make_batches()
    model = make_model()

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    opt = samfunc.sgd(LR, momentum=MOMENTUM)
    results = []
    for options in ({"rho": schedule}, {"method": samfunc.sam(schedule)}):
        step = samfunc.make_train_step(loss_fn, opt, **options)
        state = samfunc.init_train_state(samfunc.module_params(model), opt)
        rhos = []
        for batch in batches:
            state, metrics = step(state, batch)
            rhos.append(float(metrics.rho))
        results.append((state, rhos))
    assert_trees_equal(results[0][0].params, results[1][0].params)
    assert results[0][1] == results[1][1]
    # the skipped step's rho is the next step's: the clock did not move
    assert results[0][1][SKIPPED + 1] == float(schedule(torch.tensor(SKIPPED)))


def test_full_step_fraction_reads_a_train_state_and_the_class() -> None:
    model = make_model()
    method = samfunc.looksam(0.1, k=4)
    opt = samfunc.sgd(LR)
    step = samfunc.make_module_train_step(model, F.cross_entropy, opt, method=method)
    state = samfunc.init_train_state(model, opt, method=method)
    for batch in make_batches(nan_at=None)[:4]:
        state, _ = step(state, batch)
    assert samfunc.full_step_fraction(state) == 0.25
    assert samfunc.full_step_fraction(state.method_state) == 0.25
    with pytest.raises(TypeError, match="full_step_fraction takes"):
        samfunc.full_step_fraction(object())


# --- item 4: methods travel as data ------------------------------------------------------------


def round_trips(obj: Any) -> list[Any]:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return [
        pickle.loads(pickle.dumps(obj)),
        copy.deepcopy(obj),
        torch.load(buffer, weights_only=False),
    ]


@pytest.mark.parametrize("name", [*METHODS, "mesa", "normalization_mask", "rho_from_lr"])
def test_every_method_pickles_and_its_copy_runs_bitwise_the_same(name: str) -> None:
    if name == "mesa":
        make: Callable[[], samfunc.Method] = lambda: samfunc.mesa(start_step=1)  # noqa: E731
    elif name == "normalization_mask":
        norm = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        make = lambda: samfunc.sam(0.1, mask=samfunc.normalization_mask(norm))  # noqa: E731
    elif name == "rho_from_lr":
        lr = samfunc.cosine_decay_schedule(0.1, 10)
        rho = samfunc.rho_from_learning_rate(lr, rho_max=0.2, rho_min=0.02, lr_max=0.1, lr_min=0.0)
        make = lambda: samfunc.gsam(rho)  # noqa: E731
    else:
        make = METHODS[name]
    original = make()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(DTYPE)
    loss_fn = samfunc.module_loss(model, criterion(name))
    params = samfunc.module_params(model)
    batches = make_batches(nan_at=None)

    def run(method: samfunc.Method) -> Any:
        state = method.init(params)
        for batch in batches[:3]:
            grads, _, state = method.grad(loss_fn, params, batch, state, has_aux=True)
        return grads, state

    expected = run(original)
    for copy_ in round_trips(original):
        assert_trees_equal(expected, run(copy_))


def test_the_class_with_a_method_pickles_and_the_copy_goes_on_bitwise() -> None:
    batches = make_batches(nan_at=None)
    model = make_model()
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, method=samfunc.looksam(0.1, k=2), lr=LR)
    for batch in batches[:3]:
        opt.step(closure_of(model, opt, batch))
    buffer = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for batch in batches[3:]:
        opt.step(closure_of(model, opt, batch))
        loaded["opt"].step(closure_of(loaded["model"], loaded["opt"], batch))
    assert_trees_equal(samfunc.module_params(model), samfunc.module_params(loaded["model"]))
    # every state loads with weights_only=True
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state_dict = torch.load(buffer, weights_only=True)
    assert int(state_dict["method_state"].steps) == STEPS


# --- item 5: no hook outlives its optimizer --------------------------------------------------


def test_constructing_many_optimizers_leaves_no_hooks_behind() -> None:
    model = torch.nn.Linear(3, 2)
    for _ in range(200):
        samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    gc.collect()
    assert len(model.weight._post_accumulate_grad_hooks or {}) <= 1


def test_an_optimizer_dropped_mid_step_leaves_no_global_hook_behind() -> None:
    """first_step starts a global BatchNorm guard; an optimizer dropped before second_step
    must not leave it watching (and cloning) every later module's forward."""
    from torch.nn.modules.module import _global_forward_pre_hooks

    before = len(_global_forward_pre_hooks)
    w = torch.nn.Parameter(torch.ones(2))
    opt = samfunc.SAM([w], torch.optim.SGD, lr=0.1)
    w.grad = torch.ones(2)
    opt.first_step()
    assert len(_global_forward_pre_hooks) == before + 1
    del opt
    gc.collect()
    assert len(_global_forward_pre_hooks) == before


# --- item 6: BatchNorm counts one update per step, in every pattern --------------------------


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)
    )


@pytest.mark.parametrize("pattern", ["closure", "seed", "two_step", "sam_grad"])
def test_batchnorm_counts_one_update_per_step(pattern: str) -> None:
    model = bn_model()
    batches = [(x.float(), y) for x, y in make_batches(nan_at=None)[:5]]
    if pattern == "sam_grad":
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_fn(p: Any, batch: Any) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(model, p, (batch[0],)), batch[1])

        first_pass_stats = []
        for batch in batches:
            with torch.no_grad():
                before = model[1].running_mean.clone()
            samfunc.sam_grad(loss_fn, params, batch, rho=0.1)
            first_pass_stats.append(before)
    else:
        opt = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
        for x, y in batches:

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if pattern == "closure":
                opt.step(closure)
            elif pattern == "seed":
                F.cross_entropy(model(x), y).backward()
                opt.step(closure)
            else:
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
    assert int(model[1].num_batches_tracked) == 5
    # the running mean is the first passes' only: replay them at the weights of each step
    reference = bn_model()
    if pattern == "sam_grad":
        with torch.no_grad():
            for batch in batches:
                reference(batch[0])
        assert torch.allclose(reference[1].running_mean, model[1].running_mean)


# --- item 7: a custom ascent works in the class as in the functional API ----------------------


def scale_by_fisher(decay: float = 0.99) -> samfunc.GradientTransformation:
    def init(params: Any) -> Any:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def update(g: Any, state: Any, params: Any = None) -> Any:
        state = {k: decay * state[k] + (1 - decay) * g[k] ** 2 for k in g}
        return {k: g[k] / (state[k].sqrt() + 1e-8) for k in g}, state

    return samfunc.GradientTransformation(init, update)


def test_a_custom_ascent_runs_in_the_class_as_in_the_functional_api() -> None:
    def method() -> samfunc.Method:
        ascent = samfunc.chain(
            scale_by_fisher(), samfunc.normalize(), samfunc.scale_by_radius(0.05)
        )
        return samfunc.sharpness_aware(ascent)

    batches = make_batches(nan_at=None)
    model = make_model()

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    params = samfunc.module_params(model)
    opt = samfunc.sgd(LR, momentum=MOMENTUM)
    opt_state, m = opt.init(params), method()
    state = m.init(params)
    for batch in batches:
        grads, _, state = m.grad(loss_fn, params, batch, state)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = samfunc.apply_updates(params, updates)
    class_params, _, _ = class_run_with(method(), batches)
    assert_trees_close(params, class_params, atol=1e-13, rtol=1e-11)


def class_run_with(method: samfunc.Method, batches: list[Any]) -> Any:
    METHODS["_custom"] = lambda: method
    try:
        return class_run("_custom", batches)
    finally:
        del METHODS["_custom"]


# --- item 8: a bare Method(init, grad) runs in every driver -----------------------------------


def bare_method() -> samfunc.Method:
    """Plain SAM written from scratch, with no state and a grad of the documented arguments."""

    def init(params: Any) -> tuple[()]:
        return ()

    def grad(loss_fn: Any, params: Any, batch: Any, state: Any) -> Any:
        grads, loss = torch.func.grad_and_value(loss_fn)(params, batch)
        e = samfunc.perturbation(params, grads, rho=0.1)
        perturbed = {k: params[k] + e[k] for k in params}
        sam_grads, _ = torch.func.grad_and_value(loss_fn)(perturbed, batch)
        return sam_grads, loss, state

    return samfunc.Method(init, grad)


def test_a_bare_method_runs_in_every_driver() -> None:
    batches = make_batches(nan_at=None)
    expected, _ = functional_loop("sam", batches)
    METHODS["_bare"] = bare_method
    try:
        params, state = functional_loop("_bare", batches)
        assert state == ()
        assert_trees_close(expected, params, atol=1e-14, rtol=1e-12)
        step_params, _, _ = train_step_run("_bare", batches, module=False)
        assert_trees_close(expected, step_params, atol=1e-14, rtol=1e-12)
        class_params, _, _ = class_run("_bare", batches)
        assert_trees_close(expected, class_params, atol=1e-13, rtol=1e-11)
        with pytest.raises(TypeError, match="has_aux"):
            train_step_run("_bare", batches, module=True)
    finally:
        del METHODS["_bare"]


def test_a_bare_method_in_the_class_counts_one_batchnorm_update_and_one_first_pass() -> None:
    """The first call of the closure is the pass at w; later ones keep BatchNorm and are marked."""
    model = bn_model()
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1, method=bare_method())
    marks: list[bool] = []
    for x, y in [(x.float(), y) for x, y in make_batches(nan_at=None)[:4]]:

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            marks.append(samfunc.in_second_pass())
            return loss

        opt.step(closure)
    assert int(model[1].num_batches_tracked) == 4
    assert marks == [False, True] * 4


def test_a_bare_method_refuses_a_loss_scale_it_cannot_reach() -> None:
    """Its grad takes its own passes: the scale would be silently ignored."""
    opt, scale = samfunc.sgd(0.1), samfunc.dynamic_loss_scale()
    step = samfunc.make_train_step(
        lambda p, b: (p["w"] * b).sum() ** 2, opt, method=bare_method(), loss_scale=scale
    )
    params = {"w": torch.ones(3, dtype=DTYPE)}
    state = samfunc.init_train_state(params, opt, loss_scale=scale, method=bare_method())
    with pytest.raises(ValueError, match="takes its own passes, which a loss scale cannot reach"):
        step(state, torch.ones(3, dtype=DTYPE))


def test_a_bare_method_takes_a_policy() -> None:
    batches = make_batches(nan_at=None)
    METHODS["_bare_every_2"] = lambda: samfunc.with_policy(bare_method(), samfunc.every_n_steps(2))
    METHODS["_sam_every_2"] = lambda: samfunc.with_policy(
        samfunc.sam(0.1), samfunc.every_n_steps(2)
    )
    try:
        want, _ = functional_loop("_sam_every_2", batches)
        params, state = functional_loop("_bare_every_2", batches)
        assert_trees_close(want, params, atol=1e-14, rtol=1e-12)
        assert samfunc.full_step_fraction(state) == 0.5
        calls = []

        def counted(params: Any, batch: Any) -> torch.Tensor:
            calls.append(1)
            return (params["w"] * batch).sum() ** 2

        method = METHODS["_bare_every_2"]()
        p = {"w": torch.ones(3, dtype=DTYPE)}
        method_state = method.init(p)
        for _ in range(4):
            _, _, method_state = method.grad(counted, p, torch.ones(3, dtype=DTYPE), method_state)
        assert len(calls) == 2 + 1 + 2 + 1  # its own two passes on full steps, one on cheap
        class_params, _, _ = class_run("_bare_every_2", batches)
        assert_trees_close(want, class_params, atol=1e-13, rtol=1e-11)
    finally:
        del METHODS["_bare_every_2"], METHODS["_sam_every_2"]
    with pytest.raises(ValueError, match="does not expose"):
        samfunc.with_policy(bare_method(), samfunc.sharp_steps())


# --- item 9: state and options that do not fit fail clearly -----------------------------------


def test_a_per_group_rho_next_to_a_method_is_refused() -> None:
    model = make_model()
    groups = [
        {"params": model[0].parameters(), "rho": 0.5},
        {"params": model[2].parameters()},
    ]
    with pytest.raises(ValueError, match=r"param_groups\[0\] sets rho=0.5"):
        samfunc.SAM(groups, torch.optim.SGD, method=samfunc.gsam(), lr=0.1)


def test_another_methods_state_does_not_load() -> None:
    model = make_model()
    batch = make_batches(nan_at=None)[0]
    looksam = samfunc.SAM(model.parameters(), torch.optim.SGD, method=samfunc.looksam(), lr=0.1)
    looksam.step(closure_of(model, looksam, batch))
    plain = samfunc.SAM(model.parameters(), torch.optim.SGD, method=samfunc.sam(), lr=0.1)
    with pytest.raises(ValueError, match=r"a state of looksam.*this SAM's method sam"):
        plain.load_state_dict(looksam.state_dict())


#: The methods whose states the two tests below give one another, by name.
BUILD = {
    "gsam": lambda: samfunc.gsam(0.1),
    "looksam": lambda: samfunc.looksam(0.1, k=2),
    "sam": lambda: samfunc.sam(0.1),
    "momentum_sam": lambda: samfunc.momentum_sam(0.1),
    "wsam": lambda: samfunc.wsam(0.1),
    "mesa": lambda: samfunc.mesa(),
    "vasso": lambda: samfunc.vasso(0.1),
    "friendly_sam": lambda: samfunc.friendly_sam(0.1),
    "ae_sam": lambda: samfunc.ae_sam(0.1),
}


@pytest.mark.parametrize(
    ("built", "given", "kept"),
    [
        ("gsam", "looksam", "LookSamState"),
        ("sam", "momentum_sam", "MomentumSamState"),
        ("looksam", "gsam", "EmptyState"),
        ("wsam", "mesa", "MesaState"),
    ],
)
def test_another_methods_state_is_refused_by_every_driver(
    built: str, given: str, kept: str
) -> None:
    """Not silently run (gsam ignored LookSAM's state): the error names both."""
    make = BUILD
    params = {"w": torch.ones(3, dtype=DTYPE)}
    opt = samfunc.sgd(0.1)
    state = samfunc.init_train_state(params, opt, method=make[given]())
    step = samfunc.make_train_step(lambda p, b: (p["w"] * b).sum() ** 2, opt, method=make[built]())
    message = (
        f"{built} got a method state made by another method's init: its combine part is {kept}"
    )
    with pytest.raises(TypeError, match=message):
        step(state, torch.ones(3, dtype=DTYPE))
    method = make[built]()
    with pytest.raises(TypeError, match=message):
        method.grad(
            lambda p, b: (p["w"] * b).sum() ** 2,
            params,
            torch.ones(3, dtype=DTYPE),
            state.method_state,
        )


@pytest.mark.parametrize(
    ("built", "given", "part"),
    [
        ("vasso", "sam", "ascent"),
        ("sam", "vasso", "ascent"),
        ("friendly_sam", "gsam", "ascent"),
        ("ae_sam", "sam", "policy"),
        ("sam", "ae_sam", "policy"),
    ],
)
def test_another_methods_ascent_or_policy_state_is_refused_naming_the_method(
    built: str, given: str, part: str
) -> None:
    """The piece's own check, restated for the method: in method.grad, the train step, the class."""
    make = BUILD
    params = {"w": torch.ones(3, dtype=DTYPE)}
    message = f"{built} got a method state made by another method's init: its {part} part"
    loss_fn = lambda p, b: (p["w"] * b).sum() ** 2  # noqa: E731
    with pytest.raises(samfunc.StateMismatchError, match=message):
        make[built]().grad(loss_fn, params, torch.ones(3, dtype=DTYPE), make[given]().init(params))
    opt = samfunc.sgd(0.1)
    state = samfunc.init_train_state(params, opt, method=make[given]())
    step = samfunc.make_train_step(loss_fn, opt, method=make[built]())
    with pytest.raises(TypeError, match=message):
        step(state, torch.ones(3, dtype=DTYPE))
    w = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    sam = samfunc.SAM([w], torch.optim.SGD, method=make[built](), lr=0.1)
    sam.method_state = make[given]().init({"param_groups[0]['params'][0]": w.detach()})

    def closure() -> torch.Tensor:
        sam.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    with pytest.raises(TypeError, match=message):
        sam.step(closure)
    assert torch.equal(w.detach(), torch.ones(3, dtype=DTYPE))  # w untouched


def test_bad_hyperparameters_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\), got 1.5"):
        samfunc.gsam(alpha=1.5)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        samfunc.friendly_sam(sigma=-1.0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        samfunc.esam(seed=2**32 + 1)


def test_a_mask_predicate_in_the_class_sees_names_or_is_refused() -> None:
    # Issue 25, item 1: a predicate over positions would select by accident.
    def no_bias(path: str, leaf: torch.Tensor) -> bool:
        return not path.endswith("bias")

    batch = make_batches(nan_at=None)[0]

    def one_step(params: Any) -> samfunc.SAM:
        model = make_model()
        opt = samfunc.SAM(
            params(model), torch.optim.SGD, method=samfunc.sam(0.5, mask=no_bias), lr=0.0
        )
        opt.step(closure_of(model, opt, batch))
        return opt

    with pytest.raises(TypeError, match=r"model\.named_parameters\(\) instead of"):
        one_step(lambda model: model.parameters())
    opt = one_step(lambda model: model.named_parameters())
    radius = opt.method_state.ascent.radius
    assert float(radius.radius) == pytest.approx(0.5)
    model = make_model()
    params = samfunc.module_params(model)

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (b[0],)), b[1])

    method = samfunc.sam(0.5, mask=no_bias)
    grads, _, _ = method.grad(loss_fn, params, batch, method.init(params))
    reference = samfunc.SAM(model.named_parameters(), torch.optim.SGD, method=method, lr=0.0)
    reference.step(closure_of(model, reference, batch))
    got = {k: p.grad for k, p in model.named_parameters()}
    assert_trees_close(grads, got, atol=1e-14, rtol=1e-12)


def test_a_bare_method_runs_in_the_class_under_every_nonfinite_policy() -> None:
    batches = make_batches(nan_at=None)
    for policy in ("raise", "skip", "propagate"):
        model = make_model()
        opt = samfunc.SAM(
            model.named_parameters(),
            torch.optim.SGD,
            method=bare_method(),
            nonfinite=policy,  # type: ignore[arg-type]
            lr=LR,
        )
        for batch in batches[:2]:
            opt.step(closure_of(model, opt, batch))
    bad = make_batches(nan_at=0)[0]
    model = make_model()
    opt = samfunc.SAM(model.named_parameters(), torch.optim.SGD, method=bare_method(), lr=LR)

    def nan_closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(bad[0]), bad[1])
        loss.backward()
        return loss

    with pytest.raises(samfunc.NonFiniteGradientError, match="the method's gradient"):
        opt.step(nan_closure)


@pytest.mark.parametrize("name", ["ae_sam", "looksam", "mesa", "gsam"])
def test_loss_scaling_runs_every_method_as_the_unscaled_run(name: str) -> None:
    # A power-of-two scale is exact: scaled and unscaled runs agree bitwise.
    method = (lambda: samfunc.mesa(start_step=0)) if name == "mesa" else METHODS[name]
    batches = [(x.float(), y) for x, y in make_batches(nan_at=None)]
    runs = []
    for scale in (None, samfunc.dynamic_loss_scale(init_scale=2.0**10)):
        model = make_model().float()
        opt = samfunc.sgd(LR)
        options: dict[str, Any] = {} if scale is None else {"loss_scale": scale}
        step = samfunc.make_module_train_step(
            model, criterion(name), opt, method=method(), **options
        )
        state = samfunc.init_train_state(model, opt, method=method(), **options)
        for batch in batches:
            state, metrics = step(state, batch)
            assert bool(metrics.finite)
        runs.append(state)
    assert_trees_equal(runs[0].params, runs[1].params)
    assert_trees_equal(runs[0].method_state, runs[1].method_state)


def test_misuse_gets_a_clear_error() -> None:
    params = {"w": torch.ones(3)}

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        return (p["w"] * batch).sum() ** 2

    method = samfunc.sam(lambda count: "x")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="rho schedule must return a number"):
        method.grad(loss_fn, params, torch.ones(3), method.init(params))
    model = make_model()
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    F.cross_entropy(model(make_batches(nan_at=None)[0][0]), make_batches()[0][1]).backward()
    with pytest.raises(RuntimeError, match="second_step called without first_step"):
        opt.second_step()
    with pytest.raises(TypeError, match="without method= it takes the full step every time"):
        samfunc.full_step_fraction(opt)
    with pytest.raises(TypeError, match="a bare Method"):
        samfunc.full_step_fraction(())
