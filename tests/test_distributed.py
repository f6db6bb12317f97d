"""Data-parallel and sharded SAM in real processes: 2 gloo ranks on 127.0.0.1, float64.

Three spawns (each bounded by a deadline, collectives by the group's timeout)
run every scenario of tests/distributed_workers.py:

* the functional path (``sam_grad``, train steps for SAM, GSAM, VaSSO,
  LookSAM, Momentum-SAM, AE-SAM, the plain gradient, accumulation, the module
  step) in ``"local"`` mode against ``num_chunks=2`` on the whole batch and in
  ``"global"`` mode against the whole batch;
* ``samfunc.SAM`` under DDP (``no_sync`` first pass: local; plain and
  ``step(closure)``: global) and FSDP2, against a hand-written SAM loop with
  ``torch.optim.SGD``; DTensor-sharded parameters in a train step;
* one compiled (``fullgraph=True``) train step per mode against eager.

Each asserts the ranks agree bitwise and the reference to 1e-13; the
differences are printed at the end of the run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from . import distributed_workers as workers
from .multiprocess import run_processes

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

#: name -> max abs difference to the reference, printed by conftest.
DIFFERENCES: dict[str, float] = {}
TOLERANCE = 1e-13
WORLD = 2


def _names(scenarios: Any) -> list[str]:
    return list(scenarios(WORLD))


@pytest.fixture(scope="module")
def functional_results() -> list[dict[str, Any]]:
    return run_processes(workers.functional_worker, world=WORLD, timeout=240)


@pytest.fixture(scope="module")
def class_results() -> list[dict[str, Any]]:
    return run_processes(workers.class_worker, world=WORLD, timeout=240)


def _check(results: list[dict[str, Any]], name: str) -> tuple[list[Any], list[Any]]:
    per_rank = [result[name] for result in results]
    for rank, outcome in enumerate(per_rank):
        assert not isinstance(outcome, str), f"{name} failed on rank {rank}:\n{outcome}"
    (ours, reference), *others = per_rank
    for rank, (theirs, _) in enumerate(others, start=1):
        assert len(theirs) == len(ours)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"{name}: rank {rank} differs from rank 0"
    assert len(ours) == len(reference)
    difference = max(float((a - b).abs().max()) for a, b in zip(ours, reference))
    DIFFERENCES[name] = difference
    assert difference <= TOLERANCE, f"{name}: {difference:.2e} from its reference"
    return ours, reference


@pytest.mark.parametrize("name", _names(workers.functional_scenarios))
def test_functional_equals_single_process_reference(
    functional_results: list[dict[str, Any]], name: str
) -> None:
    _check(functional_results, name)


def test_local_and_global_modes_differ(functional_results: list[dict[str, Any]]) -> None:
    """The two modes are different algorithms; both are not the plain gradient either."""
    local, _ = _check(functional_results, "train_step/sam/local")
    global_, _ = _check(functional_results, "train_step/sam/global")
    plain, _ = _check(functional_results, "train_step/plain_gradient")
    assert max(float((a - b).abs().max()) for a, b in zip(local, global_)) > 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(global_, plain)) > 1e-6


def test_a_nan_on_one_process_raises_on_every_process(
    functional_results: list[dict[str, Any]],
) -> None:
    """nonfinite="raise": the check runs on averaged gradients, so no process is left waiting."""
    for rank, result in enumerate(functional_results):
        outcomes = result["nonfinite"]
        assert set(outcomes) == {
            f"{m}/{mode}" for m in ("sam", "looksam") for mode in ("local", "global")
        }
        for name, outcome in outcomes.items():
            assert outcome.startswith("raised:"), f"rank {rank}, {name}: {outcome}"


@pytest.mark.parametrize(
    "name",
    [
        *_names(workers.ddp_scenarios),
        *_names(workers.fsdp_scenarios),
        "dtensor/train_step sam",
        "dtensor/train_step gsam",
    ],
)
def test_class_and_sharded_equal_hand_written_sam(
    class_results: list[dict[str, Any]], name: str
) -> None:
    _check(class_results, name)


def test_compiled_step_across_processes_equals_eager() -> None:
    """make_train_step with data_parallel under torch.compile(fullgraph=True), both modes."""
    results = run_processes(workers.compiled_worker, world=WORLD, timeout=400)
    for name in results[0]:
        outcomes = [result[name] for result in results]
        for rank, outcome in enumerate(outcomes):
            assert not isinstance(outcome, str), f"{name} failed on rank {rank}:\n{outcome}"
        (compiled, eager), (compiled_1, _) = outcomes
        assert all(torch.equal(a, b) for a, b in zip(compiled, compiled_1))
        difference = max(float((a - b).abs().max()) for a, b in zip(compiled, eager))
        DIFFERENCES[f"{name} vs eager"] = difference
        assert difference <= TOLERANCE


def test_failing_rank_fails_the_test_instead_of_hanging() -> None:
    with pytest.raises(AssertionError, match="rank 1"):
        run_processes(workers.failing_worker, world=WORLD, timeout=60, collective_timeout=10)
