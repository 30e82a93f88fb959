"""Import direction of the evaluation code (imports inside functions count): the zoo never imports
`steer.evals`, `steer.protocols` imports nothing from steer, and there is no import cycle among `steer.evals`, `steer.zoo` and
`steer.protocols`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEER = ROOT / "steer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every steer module ``path`` imports, at any depth of the file (lazy imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if is_module(sub) else base)
    return {m for m in found if m == "steer" or m.startswith("steer.")}


def graph(folder: Path) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(folder.rglob("*.py"))}


def test_the_zoo_never_imports_the_evals() -> None:
    edges = graph(STEER / "zoo")
    assert edges  # the walk found the zoo
    offending = {m: sorted(d for d in deps if d.startswith("steer.evals")) for m, deps in edges.items()}
    assert {m: d for m, d in offending.items() if d} == {}


def test_protocols_is_a_leaf() -> None:
    assert imports_of(STEER / "protocols.py") == set()


def test_the_evals_import_only_downwards() -> None:
    edges = graph(STEER / "evals")
    allowed = (
        "steer.evals",
        "steer.zoo",
        "steer.adapters",
        "steer.errors",
        "steer.protocols",
        "steer.recipe_files",
    )
    outside = {
        m: sorted(d for d in deps if not (d == "steer" or d.startswith(allowed))) for m, deps in edges.items()
    }
    assert {m: d for m, d in outside.items() if d} == {}


def test_no_import_cycle_through_the_evals() -> None:
    nodes = {
        **graph(STEER / "evals"),
        **graph(STEER / "zoo"),
        "steer.protocols": imports_of(STEER / "protocols.py"),
    }
    edges = {m: deps & set(nodes) for m, deps in nodes.items()}
    assert "steer.evals.run" in edges and "steer.evals.runner" not in edges
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(edges.get(module, ())):
            if dep == module:
                continue
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
