"""No module imports one from a layer above it (issue 25).

Layers, lowest first: utils; config and data; modeling; freemask and evaluation; engine and
exemplars; pipeline and benchmark; cli. A module may import its own layer or a lower one.
Imports are read from the source (module level and inside functions alike), so a lazy import
is no way round the rule.
"""
from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "efsolo"

LAYERS = {
    "utils": 0,
    "config": 1, "data": 1,
    "modeling": 2,
    "freemask": 3, "evaluation": 3,
    "engine": 4, "exemplars": 4,
    "pipeline": 5, "benchmark": 5,
    "cli": 6, "__main__": 6,
}


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name under efsolo (None for the package root itself)."""
    parts = module.split(".")
    if parts[0] != "efsolo" or len(parts) == 1:
        return None
    return LAYERS[parts[1]]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted name) of every efsolo module the file imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("efsolo")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("efsolo"):
                # `from efsolo.evaluation import predict` imports the submodule
                found += [(node.lineno, f"{name}.{a.name}") if layer_of(name) is None else (node.lineno, name)
                          for a in node.names]
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        mine = layer_of(module_name(path, root))
        if mine is None:
            continue
        for line, name in imported_modules(path, root):
            theirs = layer_of(name)
            if theirs is not None and theirs > mine:
                out.append(f"{path.relative_to(root.parent)}:{line} imports {name} (layer {theirs} > {mine})")
    return out


def test_every_package_has_a_layer():
    for child in PACKAGE.iterdir():
        if child.name.startswith(("_", ".")) and child.name != "__main__.py":
            continue
        if child.is_dir() or child.suffix == ".py":
            assert child.stem in LAYERS, f"{child.name} has no layer in tests/test_layers.py"


def test_no_module_imports_from_a_layer_above_it():
    assert violations() == []


def test_the_walker_sees_an_upward_import(tmp_path):
    pkg = tmp_path / "efsolo"
    (pkg / "data").mkdir(parents=True)
    (pkg / "engine").mkdir()
    for d in (pkg, pkg / "data", pkg / "engine"):
        (d / "__init__.py").write_text("")
    (pkg / "engine" / "train.py").write_text("from efsolo.data import images\n")
    (pkg / "data" / "labels.py").write_text("def f():\n    from ..engine.train import x\n")
    found = violations(pkg)
    assert len(found) == 1 and "efsolo.engine.train" in found[0] and "data/labels.py:2" in found[0]
