"""The layers run one way: every import of every module (inside functions too), read from the source.

core (the torch-free ground floor) < the selector (ensemble_builder's numpy modules) < the trainer (torch)
< what runs members on images (ensemble_builder.prediction) < the driver (searchspace) < the CLIs and
package facades. A module imports only from its own layer or below, and no modules import each other
in a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "ensemble_builder", "trainer", "searchspace")

# (layer, module prefixes); the most specific prefix wins.
LAYERS = [
    (0, ["core"]),
    (1, ["ensemble_builder.greedy", "ensemble_builder.crossval", "ensemble_builder.candidates",
         "ensemble_builder.ensemble", "ensemble_builder.gain", "ensemble_builder.stacking"]),
    (2, ["trainer"]),
    (3, ["ensemble_builder.prediction"]),
    (4, ["searchspace"]),
    (5, ["searchspace.run", "searchspace.__init__", "searchspace.report.__main__", "ensemble_builder.__main__",
         "ensemble_builder.__init__"]),
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer(module: str) -> int:
    best = None
    for number, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (number, len(prefix))
    assert best is not None, f"{module}: in no layer; add it to LAYERS"
    return best[0]


def imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``path`` imports anywhere in it (functions included).

    A package's ``__init__`` counts only when something is taken from it, not
    when it is merely the parent of the module imported.
    """
    found = set()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t in known:
                found.add(t)
            elif t + ".__init__" in known:
                found.add(t + ".__init__")
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_from_a_layer_above_its_own(module):
    above = sorted(t for t in graph()[module] if layer(t) > layer(module))
    assert not above, f"{module} (layer {layer(module)}) imports {above}"


def test_no_circle_of_imports():
    g = graph()
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_trainer_knows_nothing_of_ensembles_or_the_driver():
    g = graph()
    for m, targets in g.items():
        if m.startswith("trainer"):
            assert not [t for t in targets if t.startswith(("ensemble_builder", "searchspace"))], m
