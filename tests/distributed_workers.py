"""What each process runs in tests/test_distributed.py (spawned; module-level functions).

Every scenario trains a few float64 steps on this process's shard of one
global batch, with data parallelism over the gloo group, and computes its
single-process reference on the whole batch in the same process:

* ``"global"`` mode: the same method on the concatenated batch;
* ``"local"`` mode: the same method with ``num_chunks=world`` on the
  concatenated batch (one ascent per chunk, i.e. per process).

A scenario returns ``(distributed result, reference)`` as flat lists of
tensors; the test compares them, and the results of the ranks bitwise.
Scenarios run in one process group one after another; an error in one is
recorded and the next runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import samfunc
from samfunc import _tree

from .multiprocess import format_exception

STEPS = 4
GLOBAL_BATCH = 16
LR = 0.1
RHO = 0.1


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH * STEPS, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (GLOBAL_BATCH * STEPS,), generator=gen)
    return x, y


def make_params(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(6, 8, generator=gen, dtype=torch.float64) * 0.5,
        "b1": torch.zeros(8, dtype=torch.float64),
        "w2": torch.randn(8, 3, generator=gen, dtype=torch.float64) * 0.5,
        "b2": torch.zeros(3, dtype=torch.float64),
    }


def loss_fn(params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    x, y = batch
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return F.cross_entropy(hidden @ params["w2"] + params["b2"], y)


def batches(rank: int | None, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's global batch, or this rank's contiguous shard of it."""
    x, y = make_data()
    out = []
    for step in range(STEPS):
        rows = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        bx, by = x[rows], y[rows]
        if rank is not None:
            shard = GLOBAL_BATCH // world
            bx, by = bx[rank * shard : (rank + 1) * shard], by[rank * shard : (rank + 1) * shard]
        out.append((bx, by))
    return out


def _reference_options(mode: str, world: int) -> dict[str, Any]:
    return {"num_chunks": world, "vectorize_chunks": False} if mode == "local" else {}


def _flat(tree: Any) -> list[torch.Tensor]:
    return [leaf.detach().clone() for leaf in _tree.leaves(tree)]


def per_sample_loss_fn(params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    x, y = batch
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return F.cross_entropy(hidden @ params["w2"] + params["b2"], y, reduction="none")


def train_run(
    rank: int | None,
    world: int,
    mode: str,
    method_fn: Callable[[], Any] | None,
    loss: Callable[..., torch.Tensor] = loss_fn,
    **extra: Any,
) -> list[torch.Tensor]:
    """Params, loss and grad norm of every step of ``make_train_step``; distributed or reference."""
    opt = samfunc.sgd(LR, momentum=0.9)
    method = None if method_fn is None else method_fn()
    options: dict[str, Any] = dict(extra)
    if method is not None:
        options["method"] = method
    if rank is None:
        if options.get("sam", True):
            options.update(_reference_options(mode, world))
    else:
        options["data_parallel"] = samfunc.data_parallel(mode)
    step = samfunc.make_train_step(loss, opt, **options)
    state = samfunc.init_train_state(make_params(), opt, method=method)
    record: list[torch.Tensor] = []
    for batch in batches(rank, world):
        state, metrics = step(state, batch)
        record += [metrics.loss, metrics.grad_norm]
    return _flat(state.params) + _flat(state.method_state) + record


def _sam_grad_run(rank: int | None, world: int, mode: str) -> list[torch.Tensor]:
    params = make_params()
    options: dict[str, Any] = {"rho": 0.1}
    if rank is None:
        options.update(_reference_options(mode, world))
    else:
        options["data_parallel"] = samfunc.data_parallel(mode)
    grads, loss = samfunc.sam_grad(loss_fn, params, batches(rank, world)[0], **options)
    return [*_flat(grads), loss]


def _module_run(
    rank: int | None, world: int, mode: str, method_fn: Callable[[], Any] | None = None
) -> list[torch.Tensor]:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double()
    opt = samfunc.sgd(LR, momentum=0.9)
    method = None if method_fn is None else method_fn()
    options: dict[str, Any] = {"rho": 0.1} if method is None else {"method": method}
    if rank is None:
        options.update(_reference_options(mode, world))
    else:
        options["data_parallel"] = samfunc.data_parallel(mode)
    step = samfunc.make_module_train_step(model, F.cross_entropy, opt, **options)
    state = samfunc.init_train_state(model, opt, method=method)
    losses = []
    for batch in batches(rank, world):
        state, metrics = step(state, batch)
        losses.append(metrics.loss)
    return _flat(state.params) + losses


def _methods() -> dict[str, Callable[[], Any] | None]:
    return {
        "sam": None,
        "gsam": lambda: samfunc.gsam(rho=0.1, alpha=0.2),
        "vasso": lambda: samfunc.vasso(rho=0.1, theta=0.4),
        "looksam": lambda: samfunc.looksam(rho=0.1, k=2, alpha=0.7),
        "momentum_sam": lambda: samfunc.momentum_sam(rho=0.3),
    }


def functional_scenarios(world: int) -> dict[str, Callable[[int | None], list[torch.Tensor]]]:
    """name -> run(rank or None for the reference)."""
    scenarios: dict[str, Callable[[int | None], list[torch.Tensor]]] = {}
    for mode in ("local", "global"):
        scenarios[f"sam_grad/{mode}"] = lambda r, m=mode: _sam_grad_run(r, world, m)
        scenarios[f"module_step/{mode}"] = lambda r, m=mode: _module_run(r, world, m)
        for name, method_fn in _methods().items():
            scenarios[f"train_step/{name}/{mode}"] = lambda r, m=mode, f=method_fn: train_run(
                r, world, m, f
            )
    scenarios["train_step/ae_sam/global"] = lambda r: train_run(
        r, world, "global", lambda: samfunc.ae_sam(rho=0.1, c=0.0, delta=0.5)
    )
    # ESAM's data selection ranks each process's own samples (as its official code under
    # DDP), so "global" equals the whole batch only without selection (gamma=1).
    for mode, gamma in (("local", 0.5), ("global", 1.0)):
        scenarios[f"train_step/esam gamma={gamma}/{mode}"] = lambda r, m=mode, g=gamma: train_run(
            r, world, m, lambda: samfunc.esam(rho=0.1, beta=0.6, gamma=g), per_sample_loss_fn
        )
    scenarios["module_step/mesa/global"] = lambda r: _module_run(
        r, world, "global", lambda: samfunc.mesa(weight=0.8, decay=0.9, start_step=1)
    )
    scenarios["train_step/plain_gradient"] = lambda r: train_run(
        r, world, "global", None, sam=False
    )
    scenarios["train_step/accum_steps=2/global"] = lambda r: train_run(
        r, world, "global", None, accum_steps=2
    )
    return scenarios


def run_scenarios(
    rank: int, world: int, scenarios: dict[str, Callable[[int | None], Any]]
) -> dict[str, Any]:
    """Each scenario's (distributed, reference) results, or its traceback."""
    out: dict[str, Any] = {}
    for name, run in scenarios.items():
        try:
            out[name] = (run(rank), run(None))
        except Exception:
            out[name] = format_exception()
    return out


def nonfinite_on_one_rank(rank: int, world: int) -> dict[str, str]:
    """A NaN in rank 1's batch only: with nonfinite="raise" every rank raises (none hangs)."""
    out = {}
    for mode in ("local", "global"):
        for name, method in (("sam", samfunc.sam(rho=RHO)), ("looksam", LOOKSAM_CHEAP)):
            x, y = batches(rank, world)[0]
            if rank == 1:
                x = x.clone()
                x[0, 0] = float("nan")
            params = make_params()
            try:
                method.grad(
                    loss_fn,
                    params,
                    (x, y),
                    method.init(params),
                    nonfinite="raise",
                    full=name == "sam",
                    data_parallel=samfunc.data_parallel(mode),
                )
                out[f"{name}/{mode}"] = "no error"
            except samfunc.NonFiniteGradientError as error:
                out[f"{name}/{mode}"] = f"raised: {error}"
    return out


LOOKSAM_CHEAP = samfunc.looksam(rho=0.1, k=2)  # full=False: its cheap step, one pass


def functional_worker(rank: int, world: int) -> dict[str, Any]:
    results = run_scenarios(rank, world, functional_scenarios(world))
    results["nonfinite"] = nonfinite_on_one_rank(rank, world)
    return results


def compiled_worker(rank: int, world: int) -> dict[str, Any]:
    """One compiled (fullgraph) train step per mode across the processes, against eager."""
    opt = samfunc.sgd(LR, momentum=0.9)
    out: dict[str, Any] = {}
    for mode in ("global", "local"):
        try:
            options = {"rho": 0.1, "data_parallel": samfunc.data_parallel(mode)}
            eager = samfunc.make_train_step(loss_fn, opt, **options)
            compiled = torch.compile(eager, fullgraph=True)
            results = []
            for step in (compiled, eager):
                state = samfunc.init_train_state(make_params(), opt)
                for batch in batches(rank, world):
                    state, metrics = step(state, batch)
                results.append([*_flat(state.params), metrics.loss, metrics.grad_norm])
            out[f"compiled/{mode}"] = tuple(results)
        except Exception:
            out[f"compiled/{mode}"] = format_exception()
    return out


# -- the SAM class under DDP and FSDP2, and DTensor parameters ------------------------------


def make_model() -> torch.nn.Module:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model.double()


def hand_sam_loop(mode: str, world: int) -> list[torch.Tensor]:
    """SAM with torch.optim.SGD in plain torch, from the paper, on the whole batch.

    ``"global"``: one ``e`` from the whole batch's gradient. ``"local"``: each
    worker's shard gets its own ``e`` from its own gradient; the gradients at
    the shards' perturbed points are averaged (what DDP with ``no_sync`` on the
    first pass computes).
    """
    model = make_model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    for x, y in batches(None, world):
        shards = [(x, y)] if mode == "global" else list(zip(x.chunk(world), y.chunk(world)))
        total = [torch.zeros_like(p) for p in params]
        for sx, sy in shards:
            grads = torch.autograd.grad(F.cross_entropy(model(sx), sy), params)
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            e = [RHO * g / (norm + 1e-12) for g in grads]
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei)
            perturbed = torch.autograd.grad(F.cross_entropy(model(sx), sy), params)
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.sub_(ei)
            total = [t + g / len(shards) for t, g in zip(total, perturbed)]
        for p, g in zip(params, total):
            p.grad = g
        opt.step()
    return _flat(params)


def _full(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """DTensors gathered whole (identical on every rank); plain tensors as they are."""
    return [t.full_tensor() if _tree.is_dtensor(t) else t for t in tensors]


def _class_run(model: torch.nn.Module, rank: int, world: int, pattern: str) -> list[torch.Tensor]:
    """Trains ``model`` (wrapped or not) with samfunc.SAM on this rank's shards."""
    opt = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for x, y in batches(rank, world):
        if pattern == "closure":

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            continue
        first_pass = model.no_sync() if pattern == "no_sync" else contextlib.nullcontext()
        with first_pass:
            F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return _full(_flat(list(model.parameters())))


def ddp_scenarios(world: int) -> dict[str, Callable[[int | None], list[torch.Tensor]]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(rank: int | None, pattern: str, mode: str) -> list[torch.Tensor]:
        if rank is None:
            return hand_sam_loop(mode, world)
        return _class_run(DDP(make_model()), rank, world, pattern)

    return {
        "ddp/local (no_sync on the first pass)": lambda r: run(r, "no_sync", "local"),
        "ddp/global": lambda r: run(r, "plain", "global"),
        "ddp/step(closure)": lambda r: run(r, "closure", "global"),
    }


def fsdp_scenarios(world: int) -> dict[str, Callable[[int | None], list[torch.Tensor]]]:
    from torch.distributed.fsdp import fully_shard

    def sharded() -> torch.nn.Module:
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        return fully_shard(model)

    def run(rank: int | None, pattern: str) -> list[torch.Tensor]:
        if rank is None:
            return hand_sam_loop("global", world)
        return _class_run(sharded(), rank, world, pattern)

    return {
        "fsdp2/first_step,second_step": lambda r: run(r, "plain"),
        "fsdp2/step(closure)": lambda r: run(r, "closure"),
    }


def _dtensor_loss(params: dict[str, Any], batch: Any) -> torch.Tensor:
    x, target = batch
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return ((hidden @ params["w2"] + params["b2"] - target) ** 2).mean()


def dtensor_scenarios(world: int) -> dict[str, Callable[[int | None], list[torch.Tensor]]]:
    """Parameters sharded as DTensors (Shard(0)) and the batch sharded over the same mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))

    def run(rank: int | None, method: Any) -> list[torch.Tensor]:
        params: dict[str, Any] = make_params()
        data = [(x, F.one_hot(y, 3).double()) for x, y in batches(rank, world)]
        if rank is not None:
            params = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()}
            data = [tuple(DTensor.from_local(t, mesh, [Shard(0)]) for t in b) for b in data]
        opt = samfunc.sgd(LR, momentum=0.9)
        step = samfunc.make_train_step(_dtensor_loss, opt, method=method)
        state = samfunc.init_train_state(params, opt, method=method)
        record = []
        for batch in data:
            state, metrics = step(state, batch)
            record += [metrics.loss, metrics.grad_norm]
        return _full(_flat(state.params) + record)

    return {
        "dtensor/train_step sam": lambda r: run(r, samfunc.sam(rho=RHO)),
        "dtensor/train_step gsam": lambda r: run(r, samfunc.gsam(rho=RHO, alpha=0.2)),
    }


def class_worker(rank: int, world: int) -> dict[str, Any]:
    scenarios = {**ddp_scenarios(world), **fsdp_scenarios(world), **dtensor_scenarios(world)}
    return run_scenarios(rank, world, scenarios)


def failing_worker(rank: int, world: int) -> None:
    """Rank 1 fails before a collective that rank 0 waits in (bounded by the group's timeout)."""
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    samfunc.all_mean({"g": torch.ones(3)})
