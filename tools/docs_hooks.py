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


def _summary(obj: Any) -> str:
    """The first line of an object's docstring, with table-breaking pipes escaped."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].replace("|", "\\|") if doc.strip() else ""


def public_names_table(reference_dir: Path) -> str:
    """A Markdown table of every reference entry: a link to it, and its docstring's first line."""
    import importlib

    rows = ["| name | what it is | page |", "|---|---|---|"]
    for name, page in reference_entries(reference_dir).items():
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
    table = public_names_table(Path(config["docs_dir"]) / "reference")
    return markdown.replace("<!-- public-names -->", table)
