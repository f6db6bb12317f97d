"""MkDocs hooks: the API reference must document every name in ``samfunc.__all__``.

``mkdocs build`` (strict or not) fails when a public name has no ``::: samfunc.NAME`` entry on a
page under ``docs/reference/``, or when an entry names something samfunc does not export.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REFERENCE_ENTRY = re.compile(r"^::: (samfunc(?:\.\w+)+)\s*$", re.MULTILINE)
EXTRA_ENTRIES = frozenset({"samfunc.models.WideResNet"})  # public, outside samfunc.__all__


def reference_entries(reference_dir: Path) -> dict[str, Path]:
    """Each ``::: samfunc.NAME`` entry of the reference pages, with the page that holds it."""
    entries: dict[str, Path] = {}
    for page in sorted(reference_dir.glob("*.md")):
        for name in REFERENCE_ENTRY.findall(page.read_text()):
            if name in entries:
                raise ValueError(f"{name} is documented twice: {entries[name].name}, {page.name}")
            entries[name] = page
    return entries


def reference_problems(reference_dir: Path) -> list[str]:
    """What keeps the reference from matching ``samfunc.__all__``; empty when it matches."""
    import samfunc

    public = {f"samfunc.{name}" for name in samfunc.__all__}
    documented = set(reference_entries(reference_dir))
    problems = [
        f"{name} is public but has no reference entry" for name in sorted(public - documented)
    ]
    problems += [
        f"{name} has a reference entry but is not in samfunc.__all__"
        for name in sorted(documented - public - EXTRA_ENTRIES)
    ]
    return problems


def on_config(config: Any) -> Any:
    """Fails the build before any page is rendered if the reference misses a public name."""
    from mkdocs.exceptions import PluginError

    problems = reference_problems(Path(config["docs_dir"]) / "reference")
    if problems:
        raise PluginError("API reference out of date:\n  " + "\n  ".join(problems))
    return config


CODE_SPAN = re.compile(r"(`+).+?\1")


def _summary(obj: Any) -> str:
    """The first line of an object's docstring, its pipes outside code spans escaped for a table."""
    import inspect

    doc = (inspect.getdoc(obj) or "").strip()
    line = doc.splitlines()[0] if doc else ""
    parts, last = [], 0
    for span in CODE_SPAN.finditer(line):
        parts += [line[last : span.start()].replace("|", "\\|"), span.group()]
        last = span.end()
    return "".join([*parts, line[last:].replace("|", "\\|")])


def public_names_table(reference_dir: Path, page_order: list[str] | None = None) -> str:
    """A Markdown table of every reference entry: a link to it, and its docstring's first line.

    Entries come page by page, in ``page_order`` (file names; the navigation's order), then in the
    order each page lists them.
    """
    import importlib

    entries = reference_entries(reference_dir)
    order = {name: index for index, name in enumerate(page_order or [])}
    by_page = sorted(entries.items(), key=lambda item: order.get(item[1].name, len(order)))
    rows = ["| name | what it is | page |", "|---|---|---|"]
    for name, page in by_page:
        module_name, _, attribute = name.rpartition(".")
        obj = getattr(importlib.import_module(module_name), attribute)
        short = name.removeprefix("samfunc.")
        title = page.read_text().splitlines()[0].lstrip("# ")
        rows.append(f"| [`{short}`][{name}] | {_summary(obj)} | [{title}]({page.name}) |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fills the reference index's ``<!-- public-names -->`` marker with the table of names."""
    if page.file.src_uri != "reference/index.md":
        return markdown
    table = public_names_table(Path(config["docs_dir"]) / "reference", _nav_order(config["nav"]))
    return markdown.replace("<!-- public-names -->", table)


def _nav_order(nav: Any) -> list[str]:
    """The file names of the reference pages, in the order the navigation lists them."""
    found: list[str] = []
    items = nav if isinstance(nav, list) else [nav]
    for item in items:
        if isinstance(item, dict):
            for value in item.values():
                found += _nav_order(value)
        elif isinstance(item, str) and item.startswith("reference/"):
            found.append(item.removeprefix("reference/"))
    return found
