"""docs/configuration.md's field tables, generated from the config dataclasses: each field's default from
the code and its meaning from the comment beside it (the same text ``--help`` shows). One place for
each field's documentation; ``tests/tools/test_config_docs.py`` fails when the file is stale.

    python -m pirl_tools.config_docs          # rewrite the tables in docs/configuration.md
    python -m pirl_tools.config_docs --check  # exit 1 if they are stale (make docs-check)

A table sits between ``<!-- fields: module:Class -->`` and ``<!-- /fields -->`` in the markdown; text
outside those markers is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import re
import sys
from pathlib import Path

from draccus.wrappers.docstring import get_attribute_docstring

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
MARKER = re.compile(
    r"(<!-- fields: (?P<target>[\w.]+:\w+)(?: (?P<prefix>[\w.]+))? -->\n)(?P<body>.*?)(<!-- /fields -->)", re.DOTALL
)


def _show(value) -> str:
    """A default as a reader would write it: enum names, double-quoted strings, JSON-ish containers."""
    if dataclasses.is_dataclass(value):
        return "(a group: its fields below)"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):  # 1e-8, not 1e-08; 0.001, not 1e-03
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value))
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_show(k)}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        inner = ", ".join(_show(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _show(f.default)
    if f.default_factory is not dataclasses.MISSING:
        if dataclasses.is_dataclass(f.default_factory):  # a group (building it may need required fields)
            return _show(f.default_factory)
        return _show(f.default_factory())
    return "(required)"


def meaning_of(cls: type, name: str) -> str:
    """The comment beside (or above) the field, on one line; '' when there is none."""
    doc = get_attribute_docstring(cls, name)
    text = doc.comment_above or doc.comment_inline or doc.docstring_below or ""
    return " ".join(text.split())


def own_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields ``cls`` itself declares or redeclares (a LeRobot base class's stay out)."""
    declared = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in declared]


def undocumented(cls: type) -> list[str]:
    return [f.name for f in own_fields(cls) if not meaning_of(cls, f.name)]


def table(cls: type, prefix: str = "") -> str:
    """Markdown rows of ``cls``'s fields; ``prefix``: the group's flag prefix (``server`` -> ``server.address``)."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in own_fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        rows.append(f"| `{name}` | `{default_of(f)}` | {meaning_of(cls, f.name).replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


def resolve(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def render(text: str) -> str:
    """``text`` with every marked table regenerated."""

    def one(m: re.Match) -> str:
        cls = resolve(m["target"])
        missing = undocumented(cls)
        if missing:
            raise ValueError(f"{m['target']}: no comment beside field(s) {', '.join(missing)}")
        return m.group(1) + table(cls, m["prefix"] or "") + m.group(5)

    return MARKER.sub(one, text)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m pirl_tools.config_docs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale; write nothing")
    args = p.parse_args()
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{DOC} is stale: run `make docs`", file=sys.stderr)
            sys.exit(1)
        return
    if fresh != current:
        DOC.write_text(fresh)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
