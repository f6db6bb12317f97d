"""Every code snippet of the documentation runs, so the docs cannot drift from the code.

Pages and their conventions: ``tests/docs_snippets.py``. Python blocks run page by page in a
fresh interpreter; a block marked ``<!-- raises: NAME -->`` must raise the message the page quotes
in the ``text`` block after it (compared word for word, whitespace runs as one space). Shell
commands are run where they can be (``torchrun`` of a page's script, on 2 processes on 127.0.0.1)
and otherwise checked: a ``pip install`` names extras that exist, a
``python -m`` command parses with that program's own argument parser, paths exist. A command no rule
knows fails the test.

A known upstream problem is told apart from a failure: with gloo on the CPU, torch 2.13 sometimes
aborts a process at interpreter exit, after the script's last line (``terminate called without an
active exception`` from a C++ destructor; plain DDP with ``torch.optim.SGD`` and no samfunc does it
in about 1 run of 7 on a 2-core machine under load). A script gets a last line that prints when it
has run to its end, and such an abort after every process printed it is accepted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_snippets import ROOT, Page, pages_with_code
from tests.multiprocess import free_port

PAGES = pages_with_code()
TIMEOUT = 300
END_MARK = "script ran to its end"
EXIT_ABORT = "terminate called without an active exception"
DRIVER = """\
import importlib.util, json, sys

page, blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for line, code, requires, raises, message in blocks:
    missing = [m for m in requires if importlib.util.find_spec(m) is None]
    if missing:
        print(f"SKIPPED {page}:{line} (needs {', '.join(missing)})", flush=True)
        continue
    if raises is None:
        exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
        print(f"RAN {page}:{line}", flush=True)
        continue
    try:
        exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
    except Exception as error:
        got = " ".join(f"{type(error).__name__}: {error}".split())
    else:
        got = "nothing was raised"
    quoted = " ".join((message or "").split())
    if message is None:
        sys.exit(f"{page}:{line}: a raises block needs the message in a text block right after it")
    if got.split(":")[0] != raises or got != quoted:
        sys.exit(f"{page}:{line}: <!-- raises: {raises} --> and the page quotes\\n  {quoted}\\n"
                 f"but the call raised\\n  {got}")
    print(f"RAN {page}:{line} (raised the quoted message)", flush=True)
"""


def _run(command: list[str], cwd: Path, processes: int = 1) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    finished = done.stdout.count(END_MARK) == processes
    upstream_exit_abort = processes > 1 and finished and EXIT_ABORT in done.stderr
    assert done.returncode == 0 or upstream_exit_abort, (
        f"{shlex.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    )
    return done


PYTHON_PAGES = [page for page in PAGES if page.python]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: p.name)
def test_python_snippets_run_in_page_order(page: Page, tmp_path: Path) -> None:
    blocks = [(b.line, b.code, list(b.requires), b.raises, b.message) for b in page.python]
    (tmp_path / "blocks.json").write_text(json.dumps([page.name, blocks]))
    (tmp_path / "driver.py").write_text(DRIVER)
    done = _run([sys.executable, "driver.py", "blocks.json"], tmp_path)
    report = [line for line in done.stdout.splitlines() if line.startswith(("RAN ", "SKIPPED "))]
    assert len(report) == len(blocks), done.stdout
    for line in report:
        if line.startswith("SKIPPED "):
            print(line)


# --- shell commands ------------------------------------------------------------------------------


def _on_this_machine(words: list[str]) -> list[str]:
    """A torchrun command as one to run here: 2 processes, one node, 127.0.0.1, a free port."""
    replace = {"--nnodes": "1", "--master-addr": "127.0.0.1", "--master-port": str(free_port())}
    replace["--nproc-per-node"] = "2"
    out = [sys.executable, "-m", "torch.distributed.run"]
    index = 0
    while index < len(words):
        out.append(words[index])
        if words[index] in replace:
            out.append(replace[words[index]])
            index += 1
        index += 1
    return out


def _torchrun(page: Page, words: list[str], tmp_path: Path) -> None:
    script = words[-1]
    assert script in page.scripts, f"{page.name} runs {script}, which it does not show"
    (tmp_path / script).write_text(
        page.scripts[script].code + f"\nprint({END_MARK!r}, flush=True)\n"
    )
    done = _run(_on_this_machine(words), tmp_path, processes=2)
    losses = re.findall(r"rank (\d): loss ([\d.]+)", done.stdout)
    assert len({loss for _, loss in losses}) <= 1, f"ranks report different losses: {losses}"


def _extras() -> set[str]:
    """The extras that pyproject.toml defines (read as text: tomllib needs Python 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = ", section, flags=re.M))


def _pip_install(words: list[str]) -> None:
    extras = _extras()
    pinned = re.search(r"pip install -q (torch==\S+)", (ROOT / ".ci/run").read_text())
    for word in words:
        if word in ("-e", "-q", "-U"):
            continue
        wanted = re.fullmatch(r"(?:samfunc|\.)\[([\w,-]+)\]", word)
        if wanted:
            unknown = set(wanted[1].split(",")) - set(extras)
            assert not unknown, f"pip install names extras that do not exist: {unknown}"
        elif word.startswith("torch=="):
            assert pinned and word == pinned[1], f"{word} is not the torch that CI installs"
        else:
            raise AssertionError(f"no rule checks 'pip install {word}'")


def _parses(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if module == "samfunc.demo":
        from samfunc.demo.__main__ import parse_args

        parse_args(argv)
    elif module == "benchmarks.step_time":
        from benchmarks import step_time

        monkeypatch.setattr(sys, "argv", ["step_time", *argv])
        step_time.parse_args()
    elif module in ("pytest", "tests.notebooks"):
        for arg in argv:
            if not arg.startswith("-"):
                assert (ROOT / arg.split("::")[0]).exists(), f"{arg} does not exist"
    else:
        raise AssertionError(f"no rule checks 'python -m {module}'")


COMMANDS = [(page, line, command) for page in PAGES for line, command in page.commands]


@pytest.mark.parametrize(
    ("page", "line", "command"), COMMANDS, ids=[f"{p.name}:{n}" for p, n, _ in COMMANDS]
)
def test_shell_commands_run_or_check(
    page: Page, line: int, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    words = shlex.split(command)
    if words[0] == "torchrun":
        _torchrun(page, words[1:], tmp_path)
    elif words[:2] == ["pip", "install"]:
        _pip_install(words[2:])
    elif words[:2] == ["python", "-m"]:
        _parses(words[2], words[3:], monkeypatch)
    elif words[0] == "mkdocs":
        assert words[1] in ("serve", "build"), command  # the build itself is a step of .ci/run
    elif words == ["bash", ".ci/run"]:
        assert (ROOT / ".ci/run").exists()
    else:
        raise AssertionError(f"{page.name}:{line}: no rule runs or checks {command!r}")


@pytest.mark.parametrize("page", [p for p in PAGES if p.scripts], ids=lambda p: p.name)
def test_every_script_is_run_by_a_command_on_its_page(page: Page) -> None:
    run = {
        shlex.split(command)[-1] for _, command in page.commands if command.startswith("torchrun")
    }
    assert set(page.scripts) <= run, f"{page.name}: scripts never run: {set(page.scripts) - run}"


def test_the_conventions_are_in_use() -> None:
    names = {page.name for page in PAGES}
    assert {"README.md", "docs/index.md", "docs/guide/scaling-out.md"} <= names
    scaling = next(page for page in PAGES if page.name == "docs/guide/scaling-out.md")
    assert set(scaling.scripts) == {"train.py", "train_ddp.py", "train_fsdp.py"}
    assert any(block.code.startswith("loader") for page in PAGES for block in page.python)


def test_the_reference_documents_every_public_name() -> None:
    from tools.docs_hooks import reference_problems

    assert reference_problems(ROOT / "docs" / "reference") == []


def test_the_reference_check_names_what_is_missing(tmp_path: Path) -> None:
    from tools.docs_hooks import reference_problems

    (tmp_path / "page.md").write_text("# Page\n\n::: samfunc.sam_grad\n\n::: samfunc.not_a_name\n")
    problems = reference_problems(tmp_path)
    assert "samfunc.sgd is public but has no reference entry" in problems
    assert "samfunc.not_a_name has a reference entry but is not in samfunc.__all__" in problems
