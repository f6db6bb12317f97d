"""LookSAM, Momentum-SAM, AE-SAM, SAM every n steps, late-phase SAM and MESA.

Each runs 12 float64 steps and is compared, step by step, with a plain loop
written from its paper or official code (tests/reference_efficient.py, torch
only); the differences are printed at the end of the run. Then: the degenerate
settings equal SAM or the base optimizer, the passes per step are counted, the
train step and the ``SAM`` class equal the functional loop, a compiled
train step is one graph per kind of step without recompiles, and a state
saved mid-run continues bitwise.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import samfunc
from tests.helpers import assert_trees_close, assert_trees_equal, max_abs_diff
from tests.reference_efficient import (
    ae_sam_reference,
    late_phase_reference,
    looksam_reference,
    mesa_reference,
    momentum_sam_reference,
    sam_every_reference,
    sam_reference,
    sgd_reference,
)
from tests.test_methods import BATCHES, LR, MOMENTUM, PARAMS, STEPS, make_params, mean_loss

#: The largest difference of each method to its reference, printed by conftest.
DIFFERENCES: dict[str, float] = {}
HYPER = {"lr": LR, "momentum": MOMENTUM}


def logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    depth = len(params) // 2
    for i in range(depth):
        x = x @ params[f"layer{i}.weight"].T + params[f"layer{i}.bias"]
        if i < depth - 1:
            x = torch.tanh(x)
    return x


def loss_and_logits(params: dict[str, torch.Tensor], batch: Any) -> tuple[torch.Tensor, Any]:
    out = logits(params, batch[0])
    return torch.nn.functional.cross_entropy(out, batch[1]), out


def run(
    method: samfunc.Method,
    batches: list[Any] = BATCHES,
    *,
    loss_fn: Callable[..., Any] = mean_loss,
    has_aux: bool = False,
    fresh_optimizer_at: int | None = None,
    params: Any = PARAMS,
) -> tuple[list[Any], Any]:
    """The functional loop, method.grad then samfunc.sgd: params after each step, last state."""
    opt = samfunc.sgd(LR, momentum=MOMENTUM)
    opt_state, state = opt.init(params), method.init(params)
    history = []
    for t, batch in enumerate(batches):
        if t == fresh_optimizer_at:
            opt_state = opt.init(params)
        grads, _, state = method.grad(loss_fn, params, batch, state, has_aux=has_aux)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = samfunc.apply_updates(params, updates)
        history.append(params)
    return history, state


def check_against(name: str, ours: list[Any], reference: list[Any]) -> None:
    assert len(ours) == len(reference) == STEPS
    difference = max(max_abs_diff(r, o) for o, r in zip(ours, reference))
    DIFFERENCES[name] = difference
    assert difference < 1e-10, f"{name}: {difference:.3e} from its reference"


# --- each method against a loop from its paper or official code -------------------------------


def test_looksam_equals_the_papers_loop() -> None:
    ours, state = run(samfunc.looksam(rho=0.1, k=3, alpha=0.7))
    reference = looksam_reference(mean_loss, PARAMS, BATCHES, rho=0.1, k=3, alpha=0.7, **HYPER)
    check_against("looksam(k=3, alpha=0.7)", ours, reference)
    assert samfunc.full_step_fraction(state) == pytest.approx(4 / 12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_momentum_sam_equals_the_official_optimizer(weight_decay: float) -> None:
    method = samfunc.momentum_sam(rho=0.3, momentum=MOMENTUM, weight_decay=weight_decay)
    ours, _ = run(method)
    reference = momentum_sam_reference(
        mean_loss, PARAMS, BATCHES, rho=0.3, weight_decay=weight_decay, **HYPER
    )
    check_against(f"momentum_sam(rho=0.3, weight_decay={weight_decay})", ours, reference)


def test_ae_sam_equals_the_papers_loop_and_takes_the_same_steps() -> None:
    ours, state = run(samfunc.ae_sam(rho=0.1, c=0.5, delta=0.9))
    reference, sam_steps = ae_sam_reference(
        mean_loss, PARAMS, BATCHES, rho=0.1, c=0.5, delta=0.9, **HYPER
    )
    check_against("ae_sam(c=0.5)", ours, reference)
    assert 0 < sum(sam_steps) < STEPS  # both kinds of step were taken
    assert int(state.full_steps) == sum(sam_steps)


def test_ae_sam_with_the_papers_schedule_of_c() -> None:
    schedule = samfunc.linear_schedule(1.0, -1.0, STEPS)
    _, state = run(samfunc.ae_sam(rho=0.1, c=schedule))
    assert 0 < int(state.full_steps) <= STEPS


def test_sam_every_n_steps_equals_composers_loop() -> None:
    policy = samfunc.every_n_steps(3, offset=2)  # Composer: the last step of each interval
    ours, state = run(samfunc.with_policy(samfunc.sam(0.1), policy))
    reference = sam_every_reference(mean_loss, PARAMS, BATCHES, rho=0.1, every=3, **HYPER)
    check_against("sam every 3 steps (Composer's interval)", ours, reference)
    assert samfunc.full_step_fraction(state) == pytest.approx(1 / 3)


def test_late_phase_sam_equals_the_official_loop() -> None:
    method = samfunc.with_policy(samfunc.sam(0.1), samfunc.from_step(5))
    # The official script starts a new optimizer at the switch; so does this loop.
    ours, _ = run(method, fresh_optimizer_at=5)
    reference = late_phase_reference(mean_loss, PARAMS, BATCHES, rho=0.1, start_step=5, **HYPER)
    check_against("late-phase sam (from step 5)", ours, reference)


def test_mesa_equals_the_official_loop() -> None:
    method = samfunc.mesa(weight=0.8, decay=0.9, temperature=5.0, start_step=2)
    ours, _ = run(method, loss_fn=loss_and_logits, has_aux=True)
    reference = mesa_reference(
        logits, PARAMS, BATCHES, decay=0.9, weight=0.8, temperature=5.0, start_step=2, **HYPER
    )
    check_against("mesa(weight=0.8, decay=0.9, T=5)", ours, reference)


# --- degenerate settings -----------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), rho=st.floats(0.0, 0.5), alpha=st.floats(0.0, 2.0))
def test_looksam_with_k_1_is_sam(seed: int, rho: float, alpha: float) -> None:
    params = make_params([4, 5, 3], seed)
    batches = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))] * 3
    ours, _ = run(samfunc.looksam(rho=rho, k=1, alpha=alpha), batches, params=params)
    sam, _ = run(samfunc.sam(rho), batches, params=params)
    assert_trees_equal(ours, sam)


def test_momentum_sam_with_rho_0_is_sgd_with_momentum_bitwise() -> None:
    ours, _ = run(samfunc.momentum_sam(rho=0.0, momentum=MOMENTUM))
    # samfunc.sgd on the plain gradient: the same bits
    plain, _ = run(samfunc.with_policy(samfunc.sam(0.1), samfunc.from_step(10**9)))
    assert_trees_equal(ours, plain)
    # torch.optim.SGD rounds one operation differently: 1 ulp
    reference = sgd_reference(mean_loss, PARAMS, BATCHES, **HYPER)
    assert max(max_abs_diff(r, o) for o, r in zip(ours, reference)) < 1e-15


def test_ae_sam_extremes_are_sam_and_sgd() -> None:
    always, state = run(samfunc.ae_sam(rho=0.1, c=-1e9))
    assert_trees_equal(always, run(samfunc.sam(0.1))[0])
    assert int(state.full_steps) == STEPS
    never, state = run(samfunc.ae_sam(rho=0.1, c=1e9))
    reference = sgd_reference(mean_loss, PARAMS, BATCHES, **HYPER)
    assert max(max_abs_diff(r, o) for o, r in zip(never, reference)) < 1e-14
    assert int(state.full_steps) == 0


@pytest.mark.parametrize(
    "policy", [samfunc.every_n_steps(1), samfunc.from_step(0)], ids=["every_1", "from_0"]
)
def test_policies_that_always_choose_full_steps_are_sam(policy: samfunc.StepPolicy) -> None:
    ours, _ = run(samfunc.with_policy(samfunc.gsam(0.1, alpha=0.3), policy))
    assert_trees_equal(ours, run(samfunc.gsam(0.1, alpha=0.3))[0])


def test_mesa_without_its_term_is_sgd() -> None:
    reference = sgd_reference(mean_loss, PARAMS, BATCHES, **HYPER)
    for method in (samfunc.mesa(weight=0.0), samfunc.mesa(start_step=STEPS)):
        ours, _ = run(method, loss_fn=loss_and_logits, has_aux=True)
        assert max(max_abs_diff(r, o) for o, r in zip(ours, reference)) < 1e-14


def test_sam_reference_agrees_with_the_methods_suite() -> None:
    ours, _ = run(samfunc.sam(0.1))
    check_against("sam", ours, sam_reference(mean_loss, PARAMS, BATCHES, rho=0.1, **HYPER))


# --- passes per step ---------------------------------------------------------------------------


class CountingLoss:
    """``mean_loss`` that counts its calls (one per forward pass)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, params: Any, batch: Any) -> torch.Tensor:
        self.calls += 1
        return mean_loss(params, batch)


@pytest.mark.parametrize(
    ("method", "passes"),
    [
        (samfunc.looksam(rho=0.1, k=5), 12 + 3),  # full at steps 0, 5, 10
        (samfunc.momentum_sam(rho=1.0), 12),
        (samfunc.with_policy(samfunc.sam(0.1), samfunc.every_n_steps(4)), 12 + 3),
        (samfunc.with_policy(samfunc.sam(0.1), samfunc.from_step(9)), 12 + 3),
        (samfunc.sam(0.1), 24),
    ],
    ids=["looksam_k5", "momentum_sam", "every_4", "from_9", "sam"],
)
def test_forward_passes_per_step(method: samfunc.Method, passes: int) -> None:
    loss = CountingLoss()
    run(method, loss_fn=loss)
    assert loss.calls == passes


def test_ae_sam_passes_are_one_plus_its_full_steps() -> None:
    loss = CountingLoss()
    _, state = run(samfunc.ae_sam(rho=0.1, c=0.5), loss_fn=loss)
    assert loss.calls == STEPS + int(state.full_steps)


# --- the train step, the class, compile, resume ------------------------------------------------


STEP_METHODS: dict[str, Callable[[], samfunc.Method]] = {
    "looksam": lambda: samfunc.looksam(rho=0.1, k=3),
    "ae_sam": lambda: samfunc.ae_sam(rho=0.1, c=0.5),
    "every_3": lambda: samfunc.with_policy(samfunc.sam(0.1), samfunc.every_n_steps(3)),
    "momentum_sam": lambda: samfunc.momentum_sam(rho=0.3),
}


def first_state(method: samfunc.Method) -> samfunc.TrainState:
    return samfunc.init_train_state(PARAMS, samfunc.sgd(LR, momentum=MOMENTUM), method=method)


def make_step(method: samfunc.Method) -> Callable[..., Any]:
    return samfunc.make_train_step(mean_loss, samfunc.sgd(LR, momentum=MOMENTUM), method=method)


@pytest.mark.parametrize("name", list(STEP_METHODS))
def test_train_step_equals_the_functional_loop(name: str) -> None:
    method = STEP_METHODS[name]()
    step, state = make_step(method), first_state(method)
    expected, final = run(STEP_METHODS[name](), BATCHES[:7])
    for batch, params in zip(BATCHES[:7], expected):
        state, metrics = step(state, batch)
        assert_trees_equal(params, state.params)
        assert bool(metrics.finite)
    assert_trees_equal(final, state.method_state)


def test_mesa_train_step_equals_the_functional_loop() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(torch.float64)
    method = samfunc.mesa(weight=0.8, decay=0.9, start_step=1)
    opt = samfunc.sgd(LR, momentum=MOMENTUM)
    step = samfunc.make_module_train_step(
        model, torch.nn.functional.cross_entropy, opt, method=method
    )
    state = samfunc.init_train_state(model, opt, method=method)
    names = {"0.weight": "layer0.weight", "0.bias": "layer0.bias"}
    names.update({"2.weight": "layer1.weight", "2.bias": "layer1.bias"})
    params = {names[k]: v for k, v in state.params.items()}
    expected, _ = run(method, BATCHES[:4], loss_fn=loss_and_logits, has_aux=True, params=params)
    for batch, want in zip(BATCHES[:4], expected):
        state, metrics = step(state, batch)
        assert_trees_close(want, {names[k]: v for k, v in state.params.items()}, atol=1e-14)
    assert metrics.output.shape == (16, 3)


@pytest.mark.parametrize("name", ["looksam", "ae_sam", "every_3", "momentum_sam"])
def test_the_class_equals_the_functional_loop(name: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(torch.float64)
    start = samfunc.module_params(model)
    calls = []

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        out = torch.func.functional_call(model, params, (batch[0],))
        return torch.nn.functional.cross_entropy(out, batch[1])

    expected, state = run(STEP_METHODS[name](), BATCHES[:7], loss_fn=loss_fn, params=start)
    opt = samfunc.SAM(
        model.parameters(), torch.optim.SGD, method=STEP_METHODS[name](), lr=LR, momentum=MOMENTUM
    )
    for batch, want in zip(BATCHES[:7], expected):

        def closure(batch: Any = batch) -> torch.Tensor:
            calls.append(1)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            return loss

        opt.step(closure)
        assert_trees_close(want, samfunc.module_params(model), atol=1e-13, rtol=1e-11)
    full = 0 if name == "momentum_sam" else int(state.full_steps)
    assert len(calls) == 7 + full  # the closure ran once on every cheap step


def test_the_class_refuses_what_a_method_cannot_do() -> None:
    model = torch.nn.Linear(2, 2)
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, method=samfunc.looksam(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="use step\\(closure\\)"):
        opt.first_step()
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, method=samfunc.momentum_sam(), lr=0.1)
    with pytest.raises(RuntimeError, match="use step\\(closure\\)"):
        opt.first_step()
    with pytest.raises(TypeError, match="mesa changes the loss"):
        samfunc.SAM(model.parameters(), torch.optim.SGD, method=samfunc.mesa(), lr=0.1)


def test_method_errors_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="has_aux=True"):
        samfunc.mesa().grad(mean_loss, PARAMS, BATCHES[0], samfunc.mesa().init(PARAMS))
    method = samfunc.ae_sam()
    with pytest.raises(ValueError, match="num_chunks"):
        method.grad(mean_loss, PARAMS, BATCHES[0], method.init(PARAMS), num_chunks=2)
    with pytest.raises(ValueError, match="already has a step policy"):
        samfunc.with_policy(samfunc.looksam(), samfunc.every_n_steps(2))
    with pytest.raises(ValueError, match="one pass per step, so a policy has no second pass"):
        samfunc.with_policy(samfunc.momentum_sam(), samfunc.every_n_steps(2))
    with pytest.raises(ValueError, match="offset"):
        samfunc.every_n_steps(3, offset=3)
    with pytest.raises(
        TypeError,
        match="looksam got a method state made by another method's init",
    ):
        samfunc.looksam().grad(mean_loss, PARAMS, BATCHES[0], samfunc.sam().init(PARAMS))


def test_full_can_be_forced_and_chunks_work_on_both_kinds() -> None:
    method = samfunc.looksam(rho=0.1, k=2)
    state = method.init(PARAMS)
    _, _, state = method.grad(mean_loss, PARAMS, BATCHES[0], state, full=True)
    for chunks in (1, 2):
        cheap, _, _ = method.grad(
            mean_loss, PARAMS, BATCHES[1], state, full=False, num_chunks=chunks
        )
        whole = samfunc.looksam(rho=0.1, k=2).grad(
            mean_loss, PARAMS, BATCHES[1], state, full=False
        )[0]
        assert_trees_close(cheap, whole, atol=1e-14)


@pytest.mark.parametrize("name", ["ae_sam", "looksam"])
def test_a_skipped_step_advances_nothing(name: str) -> None:
    # One clock: a skipped step is no update, so neither the clock nor a policy's
    # statistics nor the train state's step move; the next step is planned as if
    # the skipped one had never been tried.
    method = STEP_METHODS[name]()
    step = make_step(method)
    state, _ = step(first_state(method), BATCHES[0])
    x, y = BATCHES[1]
    skipped, metrics = step(state, (x.clone().fill_(float("nan")), y))
    assert not bool(metrics.finite)
    assert_trees_equal(state.params, skipped.params)
    assert_trees_equal(state.method_state, skipped.method_state)
    assert int(skipped.method_state.steps) == 1 and int(skipped.step) == 1


@pytest.mark.parametrize("name", list(STEP_METHODS))
def test_state_saved_mid_run_continues_bitwise(name: str) -> None:
    method = STEP_METHODS[name]()
    step = make_step(method)
    state = first_state(method)
    for batch in BATCHES[:4]:
        state, _ = step(state, batch)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = torch.load(buffer, weights_only=True)
    resumed_step = make_step(STEP_METHODS[name]())
    for batch in BATCHES[4:9]:
        state, _ = step(state, batch)
        resumed, _ = resumed_step(resumed, batch)
    assert_trees_equal(state.params, resumed.params)
    assert_trees_equal(state.method_state, resumed.method_state)


@pytest.mark.parametrize(("name", "graphs"), [("looksam", 2), ("ae_sam", 3)])
def test_compiled_steps_are_one_graph_per_kind_without_recompiles(name: str, graphs: int) -> None:
    torch._dynamo.reset()
    method = STEP_METHODS[name]()
    eager = make_step(method)
    compiled = samfunc.compile_step(make_step(method), fullgraph=True)
    eager_state = compiled_state = first_state(method)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in BATCHES[:8]:
            eager_state, _ = eager(eager_state, batch)
            compiled_state, _ = compiled(compiled_state, batch)
    assert_trees_close(eager_state.params, compiled_state.params, atol=1e-12, rtol=1e-10)
    full_steps = int(eager_state.method_state.full_steps)
    assert int(compiled_state.method_state.full_steps) == full_steps
    assert 0 < full_steps < 8
    assert samfunc.full_step_fraction(compiled_state) == full_steps / 8
    assert counters["stats"]["unique_graphs"] == graphs
    for fullgraph in (True, False):  # samfunc's message first, not Dynamo's, nor a silent eager run
        with pytest.raises(Exception) as raised:
            torch.compile(make_step(method), fullgraph=fullgraph)(compiled_state, BATCHES[0])
        first_line = str(raised.value).splitlines()[0]
        assert "chooses each step's kind in Python: compile it with samfunc.compile_step" in (
            first_line
        ), first_line


def test_accumulation_gives_the_whole_batch_step_for_both_kinds() -> None:
    for method in (STEP_METHODS["ae_sam"], STEP_METHODS["looksam"], STEP_METHODS["momentum_sam"]):
        whole, state = run(method(), BATCHES[:6])
        opt = samfunc.sgd(LR, momentum=MOMENTUM)
        params, m = PARAMS, method()
        opt_state, accumulated = opt.init(params), m.init(params)
        for batch, want in zip(BATCHES[:6], whole):
            grads, _, accumulated = m.grad(mean_loss, params, batch, accumulated, accum_steps=2)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = samfunc.apply_updates(params, updates)
            assert_trees_close(want, params, atol=1e-13, rtol=1e-11)
        if isinstance(state, samfunc.MethodState):
            assert int(accumulated.full_steps) == int(state.full_steps)
