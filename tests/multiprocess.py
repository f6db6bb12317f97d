"""Runs a function in several real processes joined by a gloo process group on 127.0.0.1.

Every wait is bounded: the process group's own timeout (a collective that one
rank never joins fails after ``collective_timeout`` seconds), and the parent's
deadline, after which every process still alive is killed and the test fails
instead of hanging the suite. A worker's exception comes back as its traceback.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    collective_timeout: float,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        try:
            # Bytes, not tensors: a tensor sent through a queue lives in shared
            # memory that goes away with this process, maybe before it is read.
            payload = io.BytesIO()
            torch.save(fn(rank, world, *args), payload)
            results.put((rank, "ok", payload.getvalue()))
            dist.barrier()  # gloo may abort a process that tears down while its peer still sends
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_processes(
    fn: Callable[..., Any],
    *args: Any,
    world: int = 2,
    timeout: float = 240.0,
    collective_timeout: float = 60.0,
) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` spawned processes; their results by rank.

    ``fn`` must be importable (a module-level function). Raises AssertionError
    with the worker's traceback if one fails, or if the deadline passes.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [
        context.Process(
            target=_entry,
            args=(rank, world, port, fn, args, results, collective_timeout),
            daemon=True,
        )
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(collected) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{world} processes did not finish within {timeout} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead and results.empty():
                    raise AssertionError(
                        f"a process died with exit code {dead[0].exitcode} before reporting"
                    ) from None
                continue
            if status == "ok":
                collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise AssertionError("a process failed:\n" + "\n".join(errors))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    return [collected[rank] for rank in range(world)]


def format_exception() -> str:
    """The current exception's traceback (for workers that collect per-scenario errors)."""
    return traceback.format_exc()
