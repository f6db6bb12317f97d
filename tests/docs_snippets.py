"""Reads the code out of the documentation pages, the way ``tests/test_docs.py`` runs it.

The conventions a page follows (``docs/`` and the README):

- Every fenced ``python`` block runs, in page order, in one namespace per page (one fresh
  interpreter per page, in an empty temporary folder), as a reader would paste them one by one.
- ``<!-- test-setup`` ... ``-->`` is Python the site does not show (a ``loader`` a reader already
  has); it runs where it stands.
- ``<!-- test-requires: optax, jax -->`` on the line before a block: the block runs only where
  those modules import; elsewhere it is reported as skipped.
- A ``python`` block whose first line is ``# name.py`` is a script: it is saved as ``name.py`` and
  run by the page's ``bash`` blocks (``torchrun ... name.py``), never in the namespace.
- Each line of a ``bash`` block is a command that is run or checked (see ``tests/test_docs.py``).
- ``<!-- raises: TypeError -->`` on the line before a ``python`` block: the block must raise that
  exception (its class name, exactly), and the ``text`` block right after it holds the message as
  Python prints a traceback's last line, ``TypeError: ...``. The test compares the two word for
  word; the one normalisation is that every run of whitespace (line breaks included) counts as one
  space, so a long message may be wrapped. An error message quoted anywhere else in prose is
  refused by ``tests/test_docs_claims.py``.
- Blocks in other languages (``text``, ``diff``) are not code to run.

Measured numbers in prose follow a convention of their own (``<!-- cost: ... -->`` and
``<!-- result: ... -->``): see ``tests/test_docs_claims.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")],
    key=lambda p: str(p.relative_to(ROOT)),
)
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<language>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```$", re.M | re.S
)
SETUP = re.compile(r"^<!-- test-setup\n(?P<body>.*?)^-->$", re.M | re.S)
REQUIRES = re.compile(r"<!-- test-requires: (?P<modules>[\w., ]+) -->\n")
RAISES = re.compile(r"<!-- raises: (?P<error>\w+) -->\n")
MARKERS = re.compile(r"(?:<!-- [\w-]+: [^\n]*-->\n)+$")
SCRIPT = re.compile(r"# (?P<name>[\w.-]+\.py)\n")


@dataclass
class Block:
    """One piece of code on a page: its language, text, where it starts, what it needs."""

    language: str
    code: str
    line: int
    requires: tuple[str, ...] = ()
    script: str | None = None
    raises: str | None = None
    message: str | None = None


@dataclass
class Page:
    """A documentation page's code, in page order."""

    path: Path
    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The page's path from the repository root."""
        return str(self.path.relative_to(ROOT))

    @property
    def python(self) -> list[Block]:
        """The blocks that run in the page's namespace (setup included, scripts excluded)."""
        return [b for b in self.blocks if b.language == "python" and b.script is None]

    @property
    def raising(self) -> list[Block]:
        """The ``<!-- raises: ... -->`` blocks, each with the message the page quotes."""
        return [b for b in self.blocks if b.raises is not None]

    @property
    def scripts(self) -> dict[str, Block]:
        """The page's ``# name.py`` scripts, by file name."""
        return {b.script: b for b in self.blocks if b.script is not None}

    @property
    def commands(self) -> list[tuple[int, str]]:
        """Each command of the page's bash blocks, comments removed, with its line number."""
        found = []
        for block in self.blocks:
            if block.language != "bash":
                continue
            for offset, line in enumerate(block.code.splitlines()):
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    found += [(block.line + offset, part.strip()) for part in line.split(" && ")]
        return found


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def read_page(path: Path) -> Page:
    """Parses a Markdown page into its code blocks and hidden setup, in order."""
    text = path.read_text()
    page = Page(path)
    found: list[tuple[int, Block]] = []
    after_raising: int | None = None  # where the last raises block ended
    for match in FENCE.finditer(text):
        body = match["body"]
        indent = len(match["indent"])
        code = "\n".join(line[indent:] for line in body.splitlines()) + "\n"
        markers = MARKERS.search(text, 0, match.start())
        above = markers.group() if markers and markers.end() == match.start() else ""
        requires_match, raises_match = REQUIRES.search(above), RAISES.search(above)
        requires: tuple[str, ...] = ()
        if requires_match:
            requires = tuple(m.strip() for m in requires_match["modules"].split(","))
        script = SCRIPT.match(code)
        language = match["language"] or "text"
        between = text[after_raising : match.start()] if after_raising is not None else "x"
        if language == "text" and not between.strip():
            found[-1][1].message = code
        after_raising = None
        block = Block(
            language,
            code,
            _line_of(text, match.start("body")),
            requires,
            script["name"] if script and language == "python" else None,
            raises_match["error"] if raises_match and language == "python" else None,
        )
        if block.raises is not None:
            after_raising = match.end()
        found.append((match.start(), block))
    for match in SETUP.finditer(text):
        found.append(
            (match.start(), Block("python", match["body"], _line_of(text, match.start("body"))))
        )
    page.blocks = [block for _, block in sorted(found, key=lambda item: item[0])]
    return page


def pages_with_code() -> list[Page]:
    """Every documentation page that holds Python or shell code."""
    pages = [read_page(path) for path in PAGES]
    return [p for p in pages if any(b.language in ("python", "bash") for b in p.blocks)]
