"""What the documentation claims is what the code does and what was measured.

Error messages. A page quotes an error message only as a checked pair (``tests/docs_snippets.py``):

    <!-- raises: TypeError -->
    ```python
    samfunc.sgd(0.1, momentum=0.9, nesterov="no")
    ```

    ```text
    TypeError: nesterov must be True or False, got 'no'
    ```

``tests/test_docs.py`` runs the call in the page's namespace and compares the message word for
word (every run of whitespace counts as one space). Here, no inline code span of the prose may
quote a message (``ValueError: ...`` or ``ValueError("...")``) outside such a pair.

Measured numbers. A number that was measured carries a marker right after it (its unit, ``x``,
``%``, `` ms`` or `` s``, in between), naming the results file and where in it the number is:

    LookSAM costs 1.32x<!-- cost: benchmarks/results/efficient/step_time_cpu.json
    models/mlp/times/looksam/median_ms / models/mlp/times/sgd/median_ms --> SGD's step.

(on one line in a page). The marker's expression is a path into the JSON file, ``/``-separated
(a component ``key=value`` picks the element of a list whose ``key`` is ``value``; quote a path
that holds spaces), optionally divided by a second path (`` / `` between spaces) and multiplied
by a factor (``* 100`` for a percentage). The test computes it and compares it with the number
shown, rounded to the decimals shown.

- ``cost:`` a time, or a ratio of times. The results file must be a JSON file under
  ``benchmarks/results/`` with its ``command`` and ``machine``, and the claim's paragraph (for a
  table: the table and the paragraph before it) must name the results file (the ``.json`` or the
  ``.md`` next to it), the model and its batch (the ``label`` and ``batch`` of the JSON entry
  the path goes through) and the machine (``2 CPU cores``, ``one torch thread`` when it ran
  on fewer threads than cores, or the GPU's name).
- ``result:`` any other measured number (an accuracy). The results file must hold its
  ``command`` and the paragraph must name the file.

A number that looks like a cost (``1.32x``, ``17.3 ms``) without a marker fails the test,
unless it is a bound (after ``<=``, ``at most``, ``within``, ``under``). Reports that a
command wrote (pages whose first line is ``Command: `...```) are the results themselves and
are not scanned.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.docs_snippets import FENCE, PAGES, ROOT, SETUP, read_page

MARKER = re.compile(r"<!-- (?P<kind>cost|result): (?P<body>[^\n]*?) -->")
NUMBER_BEFORE = re.compile(r"(?P<number>-?\d+(?:\.\d+)?)(?:x|%| ms| s)?$")
QUOTED_ERROR = re.compile(r"^\w*(?:Error|Exception|Warning)\s*(?::|\()\s*\S")
CODE_SPAN = re.compile(r"(`+)(?P<code>.+?)\1")
COST_LIKE = re.compile(r"(?<![\w.])\d+\.\d+x(?!\w)|(?<![\w.])\d+(?:\.\d+)? ?ms\b")
BOUND_BEFORE = re.compile(r"(?:<=|≤|at most|within|under|below)\s*$")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def prose(text: str) -> str:
    """The page without its code blocks and hidden setup (blank lines keep the line numbers)."""

    def blank(match: re.Match[str]) -> str:
        return "\n" * match.group().count("\n")

    return FENCE.sub(blank, SETUP.sub(blank, text))


def generated(text: str) -> bool:
    """A report that a command wrote: its first line names the command."""
    return text.startswith("Command: `")


@dataclass
class Claim:
    """One marked number on a page."""

    page: str
    line: int
    column: int
    kind: str
    source: str
    expression: list[str]
    shown: str
    context: str  # the paragraph (and a table's caption), whitespace runs as one space

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.column}"


def _paragraphs(text: str) -> list[tuple[int, int, str]]:
    """(first line, last line, text) of each run of non-blank lines."""
    found, start, lines = [], None, text.split("\n")
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip() and start is None:
            start = number
        elif not line.strip() and start is not None:
            found.append((start, number - 1, "\n".join(lines[start - 1 : number - 1])))
            start = None
    return found


def _context(paragraphs: list[tuple[int, int, str]], line: int) -> str:
    """The paragraph holding ``line``; for a table, the table and the paragraph before it."""
    for index, (first, last, text) in enumerate(paragraphs):
        if first <= line <= last:
            if text.lstrip().startswith("|") and index > 0:
                return paragraphs[index - 1][2] + "\n" + text
            return text
    raise AssertionError(f"line {line} is in no paragraph")


def claims() -> list[Claim]:
    """Every marked number of the README and the docs."""
    found = []
    for path in PAGES:
        text = prose(path.read_text())
        paragraphs = _paragraphs(text)
        name = str(path.relative_to(ROOT))
        for match in MARKER.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            line_start = text.rfind("\n", 0, match.start()) + 1
            before = text[line_start : match.start()].rstrip()
            number = NUMBER_BEFORE.search(before)
            words = shlex.split(match["body"])
            found.append(
                Claim(
                    name,
                    line,
                    match.start() - line_start + 1,
                    match["kind"],
                    words[0],
                    words[1:],
                    number["number"] if number else f"no number before the marker: {before!r}",
                    " ".join(_context(paragraphs, line).split()),
                )
            )
    return found


CLAIMS = claims()


def _lookup(results: Any, path: str) -> tuple[Any, list[dict[str, Any]]]:
    """The value at ``path`` and the dicts on the way that name a model (``label``, ``batch``)."""
    node, models = results, []
    for key in path.split("/"):
        if isinstance(node, list):
            field, _, wanted = key.partition("=")
            matches = [item for item in node if str(item.get(field)) == wanted]
            assert len(matches) == 1, f"{path}: {len(matches)} elements with {key}"
            node = matches[0]
        else:
            assert isinstance(node, dict) and key in node, f"{path}: no {key!r}"
            node = node[key]
        if isinstance(node, dict) and {"label", "batch"} <= set(node):
            models.append(node)
    return node, models


def evaluate(results: Any, expression: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """``PATH [/ PATH] [* FACTOR]`` over ``results``; also the model entries it went through."""
    value, models = _lookup(results, expression[0])
    rest = expression[1:]
    if rest[:1] == ["/"]:
        divisor, more = _lookup(results, rest[1])
        value, models, rest = value / divisor, models + more, rest[2:]
    if rest[:1] == ["*"]:
        value, rest = value * float(rest[1]), rest[2:]
    assert not rest, f"cannot read {' '.join(expression)!r}: PATH [/ PATH] [* FACTOR]"
    return float(value), models


def machine_words(machine: dict[str, Any]) -> list[str]:
    """What a paragraph says to name the machine of a run."""
    if machine.get("gpu"):
        return [str(machine["gpu"])]
    words = [f"{machine['cpu_count']} CPU cores"]
    threads = machine.get("torch_threads")
    if threads and threads != machine["cpu_count"]:
        words.append(f"{NUMBER_WORDS.get(threads, threads)} torch thread")
    return words


def _load(claim: Claim) -> dict[str, Any]:
    path = ROOT / claim.source
    assert path.suffix == ".json" and path.is_file(), f"{claim.id}: no results file {claim.source}"
    results: dict[str, Any] = json.loads(path.read_text())
    assert results.get("command"), f"{claim.id}: {claim.source} does not say its command"
    return results


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.id)
def test_a_measured_number_is_its_results_file_rounded(claim: Claim) -> None:
    value, _ = evaluate(_load(claim), claim.expression)
    decimals = len(claim.shown.partition(".")[2])
    assert f"{value:.{decimals}f}" == claim.shown, (
        f"{claim.id}: the page says {claim.shown}, {claim.source} gives {value:.{decimals + 2}f}"
    )


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.id)
def test_a_claim_names_its_source_and_a_cost_its_model_batch_and_machine(claim: Claim) -> None:
    results = _load(claim)
    named = {claim.source, str(Path(claim.source).with_suffix(".md"))}
    assert any(name in claim.context for name in named), (
        f"{claim.id}: the paragraph does not name {claim.source} (or its .md)"
    )
    if claim.kind == "result":
        return
    assert claim.source.startswith("benchmarks/results/"), f"{claim.id}: not a benchmark result"
    assert "machine" in results, f"{claim.id}: {claim.source} does not say its machine"
    _, models = evaluate(results, claim.expression)
    assert models, f"{claim.id}: the path goes through no model entry (label, batch)"
    for model in models:
        assert model["label"] in claim.context, f"{claim.id}: does not name {model['label']!r}"
        assert re.search(rf"\bbatch {model['batch']}\b|\({model['batch']}\)", claim.context), (
            f"{claim.id}: does not name the batch, {model['batch']}"
        )
    for words in machine_words(results["machine"]):
        assert words in claim.context, f"{claim.id}: does not name the machine: {words!r}"


def _inline_code(text: str) -> list[tuple[int, str]]:
    return [
        (text.count("\n", 0, m.start()) + 1, m["code"].strip()) for m in CODE_SPAN.finditer(text)
    ]


def test_no_page_quotes_an_error_message_outside_a_checked_pair() -> None:
    quoted = [
        f"{path.relative_to(ROOT)}:{line}: {code}"
        for path in PAGES
        for line, code in _inline_code(prose(path.read_text()))
        if QUOTED_ERROR.match(code)
    ]
    assert not quoted, "quote these under <!-- raises: ... --> or drop the quote:\n" + "\n".join(
        quoted
    )


def test_a_raises_block_is_followed_by_its_message() -> None:
    problems = []
    for path in PAGES:
        for block in read_page(path).blocks:
            if block.raises is None:
                continue
            where = f"{path.relative_to(ROOT)}:{block.line}"
            if block.message is None:
                problems.append(f"{where}: no text block right after the raises block")
            elif not block.message.startswith(f"{block.raises}: "):
                problems.append(f"{where}: the message does not start with '{block.raises}: '")
    assert not problems, "\n".join(problems)


def test_a_number_that_looks_like_a_cost_is_marked() -> None:
    unmarked = []
    for path in PAGES:
        text = path.read_text()
        if generated(text):
            continue
        text = CODE_SPAN.sub(lambda m: " " * len(m.group()), prose(text))
        for match in COST_LIKE.finditer(text):
            after, before = text[match.end() :], text[: match.start()]
            if MARKER.match(after) or BOUND_BEFORE.search(before):
                continue
            line = text.count("\n", 0, match.start()) + 1
            unmarked.append(f"{path.relative_to(ROOT)}:{line}: {match.group()}")
    assert not unmarked, "mark these <!-- cost: ... --> or drop them:\n" + "\n".join(unmarked)


def test_the_conventions_are_in_use() -> None:
    rejects = read_page(ROOT / "docs" / "guide" / "rejects.md")
    assert len(rejects.raising) >= 10
    assert {claim.kind for claim in CLAIMS} == {"cost", "result"}
    assert any(claim.page == "docs/guide/efficient.md" for claim in CLAIMS)


def test_the_checks_catch_a_wrong_number_and_a_missing_machine() -> None:
    results = {
        "command": "python -m benchmarks.x",
        "machine": {"cpu_count": 2, "torch_threads": 1, "device": "cpu"},
        "models": {"m": {"label": "MLP 8-8", "batch": 4, "t": {"a": 3.0, "b": 2.0}}},
    }
    value, models = evaluate(results, ["models/m/t/a", "/", "models/m/t/b", "*", "100"])
    assert value == 150.0 and models[0]["label"] == "MLP 8-8"
    assert machine_words(results["machine"]) == ["2 CPU cores", "one torch thread"]
    text = "It costs 1.50x<!-- cost: f.json models/m/t/a / models/m/t/b --> and 17 ms here.\n"
    assert [m.group() for m in COST_LIKE.finditer(text)] == ["1.50x", "17 ms"]
    assert NUMBER_BEFORE.search(text[: MARKER.search(text).start()])["number"] == "1.50"  # type: ignore[union-attr,index]
    assert QUOTED_ERROR.match("ValueError: rho must be >= 0, got -0.5")
    assert QUOTED_ERROR.match('ValueError("momentum must be in [0, 1), got 1.0")')
    assert not QUOTED_ERROR.match("NonFiniteGradientError")
