"""The folders show the data flow, and a test keeps them that way.

- ``lerobot_policy_pi_rl``: the LeRobot plugin, the science only; it imports no other project package.
- ``pirl``: what both runtimes share (wire code, codec, TLS and tokens, export, CLI helpers); it may
  use the plugin (export traces the policy), never a runtime or a tool.
- ``edge`` and ``learner``: the two runtimes; they never import each other, nor the tools.
- ``pirl_tools``: the product's tools (demo, bench, SFT and init CLIs); they may use everything.
No import cycles between modules of the project either. Read from source (ast): nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lerobot_policy_pi_rl", "pirl", "pirl_tools", "edge", "learner")
FORBIDDEN = {  # package -> project packages it must not import
    "lerobot_policy_pi_rl": {"pirl", "pirl_tools", "edge", "learner"},
    "pirl": {"pirl_tools", "edge", "learner"},
    "edge": {"learner", "pirl_tools"},
    "learner": {"edge", "pirl_tools"},
    "pirl_tools": set(),
}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages under ``root``."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (``from a.b import c`` gives a.b and a.b.c), relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to its longest project-module prefix)."""
    mods = project_modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        targets = {resolve(n) for n in imported_names(mod, path)}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        pkg = mod.split(".")[0]
        bad += [f"{mod} imports {t}" for t in sorted(targets) if t.split(".")[0] in FORBIDDEN[pkg]]
    return bad


def problems(root: Path) -> list[str]:
    graph = import_graph(root)
    return [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)] + forbidden_imports(graph)


def test_the_project_has_no_import_cycle_and_no_forbidden_direction():
    graph = import_graph(ROOT)
    assert len(graph) > 50  # the whole tree was read
    assert problems(ROOT) == []


def test_the_check_finds_a_planted_cycle_and_a_forbidden_import(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "edge" / "a.py").write_text("from edge import b\n")
    (tmp_path / "edge" / "b.py").write_text("import edge.a\n")
    (tmp_path / "learner" / "c.py").write_text("from . import d\n")
    (tmp_path / "learner" / "d.py").write_text("from .c import thing\n")
    (tmp_path / "lerobot_policy_pi_rl" / "e.py").write_text("def f():\n    from pirl.cli import run_cli\n")
    (tmp_path / "edge" / "g.py").write_text("import learner.c\n")
    assert problems(tmp_path) == [
        "cycle: edge.a <-> edge.b",
        "cycle: learner.c <-> learner.d",
        "edge.g imports learner.c",
        "lerobot_policy_pi_rl.e imports pirl",
    ]
