"""Runs every snippet of the README's "Scaling out" section as a user would.

A Python block that starts with ``# name.py`` is a script: it is saved under
that name and launched with ``torchrun`` on 2 processes on 127.0.0.1 (each
``torchrun`` line of the bash block as written, the several-machines one
turned into one machine: ``--nnodes 1``, the loopback address, a free port).
Other Python blocks run as they are, in a fresh interpreter. Every run is
bounded by a timeout.

A known upstream problem is told apart from a failure: with gloo on the CPU,
torch 2.13 sometimes aborts a process at interpreter exit, after the script's
last line (``terminate called without an active exception`` from a C++
destructor; plain DDP with ``torch.optim.SGD`` and no samfunc does it in about
1 run of 7 on this 2-core machine under load). A script is appended a line
that prints when it has run to its end, and such an abort after every
process printed it is accepted.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from .multiprocess import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT = 180

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _section() -> str:
    text = README.read_text()
    start = text.index("\n## Scaling out\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.DOTALL)


def _scripts() -> dict[str, str]:
    scripts = {}
    for block in _blocks("python"):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w.]+\.py", first):
            scripts[first[2:]] = block
    return scripts


def _others() -> list[str]:
    return [b for b in _blocks("python") if not re.match(r"# [\w.]+\.py\n", b)]


def _torchrun_lines() -> list[str]:
    return [
        line.split("#")[0].strip()
        for block in _blocks("bash")
        for line in block.splitlines()
        if line.startswith("torchrun ")
    ]


def _on_this_machine(line: str) -> list[str]:
    """A torchrun line as a command here: 2 processes, one node, 127.0.0.1, a free port."""
    words = shlex.split(line)[1:]
    replace = {"--nnodes": "1", "--master-addr": "127.0.0.1", "--master-port": str(free_port())}
    replace["--nproc-per-node"] = "2"
    out = [sys.executable, "-m", "torch.distributed.run"]
    index = 0
    while index < len(words):
        word = words[index]
        out.append(word)
        if word in replace:
            out.append(replace[word])
            index += 1
        index += 1
    return out


END_MARK = "script ran to its end"
EXIT_ABORT = "terminate called without an active exception"


def _write_script(directory: Path, name: str) -> None:
    (directory / name).write_text(_scripts()[name] + f"\nprint({END_MARK!r}, flush=True)\n")


def _run(command: list[str], cwd: Path, processes: int = 1) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    finished = done.stdout.count(END_MARK) == processes
    upstream_exit_abort = finished and EXIT_ABORT in done.stderr
    assert done.returncode == 0 or upstream_exit_abort, (
        f"{shlex.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def test_the_section_has_what_it_promises() -> None:
    assert set(_scripts()) >= {"train.py", "train_ddp.py", "train_fsdp.py"}
    assert len(_torchrun_lines()) == 2


@pytest.mark.parametrize("index", range(2))
def test_torchrun_commands_run_the_functional_script(tmp_path: Path, index: int) -> None:
    _write_script(tmp_path, "train.py")
    line = _torchrun_lines()[index]
    output = _run(_on_this_machine(line), tmp_path, processes=2)
    losses = re.findall(r"rank (\d): loss ([\d.]+)", output)
    assert sorted(rank for rank, _ in losses) == ["0", "1"]
    assert len({loss for _, loss in losses}) == 1, f"ranks report different losses: {losses}"


@pytest.mark.parametrize("name", ["train_ddp.py", "train_fsdp.py"])
def test_class_scripts_run_under_torchrun(tmp_path: Path, name: str) -> None:
    _write_script(tmp_path, name)
    command = _on_this_machine(f"torchrun --standalone --nproc-per-node 2 {name}")
    _run(command, tmp_path, processes=2)


@pytest.mark.parametrize("index", range(len(_others())))
def test_framework_recipes_run(tmp_path: Path, index: int) -> None:
    (tmp_path / "recipe.py").write_text(_others()[index] + f"\nprint({END_MARK!r})\n")
    _run([sys.executable, "recipe.py"], tmp_path)
