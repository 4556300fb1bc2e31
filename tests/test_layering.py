"""The package's layering (docs/design.md §2), read from the source: every import of
every module, at the top or inside a function, goes down or sideways within its folder,
never up, and the folders form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vaeflow"

# unit -> the units its modules may import (besides their own unit)
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "atomic": set(),
    "layers": set(),
    "flows": {"layers"},
    "models": {"flows", "layers", "config"},
    "data": {"atomic"},
    "run": {"package", "models", "flows", "layers", "data", "config", "atomic"},
    "tools": {"run", "models", "flows", "layers", "data", "config", "atomic"},
    "cli": {"tools", "run", "models", "flows", "layers", "data", "config", "atomic"},
    "__main__": {"cli"},
    # vaeflow/__init__.py re-exports lazily (importlib, by name), importing nothing itself
    "package": set(),
}


def _unit(module: str) -> str:
    """``vaeflow.models.vae`` -> ``models``; ``vaeflow`` -> ``package``."""
    parts = module.split(".")
    assert parts[0] == "vaeflow", module
    return parts[1] if len(parts) > 1 else "package"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str | None = None) -> list[str]:
    """Absolute names of the vaeflow modules (or packages) that ``path`` imports."""
    source = path.read_text() if source is None else source
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "vaeflow"]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "vaeflow":
                continue
            found.append(base)
            # ``from vaeflow.models import vae``: the submodules count too
            for alias in node.names:
                candidate = PACKAGE.parent / Path(*base.split("."), alias.name)
                if candidate.with_suffix(".py").exists() or candidate.is_dir():
                    found.append(f"{base}.{alias.name}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("vaeflow"):
                found.append(str(arg.value))
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    unit = _unit(_module_name(path))
    allowed = ALLOWED[unit] | {unit}
    return [
        f"{_module_name(path)} imports {target} ({unit} may import {sorted(allowed)})"
        for target in imports_of(path, source)
        if _unit(target) not in allowed
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_unit():
    assert MODULES
    assert {_unit(_module_name(p)) for p in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path):
    assert violations(path) == []


def test_the_units_form_no_cycle():
    """A depth-first search of ALLOWED: a back edge would be a cycle between folders."""
    state: dict[str, str] = {}

    def visit(unit: str, trail: tuple[str, ...]) -> None:
        state[unit] = "open"
        for nxt in ALLOWED[unit]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join((*trail, nxt))}"
            if nxt not in state:
                visit(nxt, (*trail, nxt))
        state[unit] = "done"

    for unit in ALLOWED:
        if unit not in state:
            visit(unit, (unit,))


def test_flows_and_models_import_nothing_of_the_run_layer():
    for folder in ("flows", "models"):
        for path in (PACKAGE / folder).rglob("*.py"):
            units = {_unit(t) for t in imports_of(path)}
            assert not units & {"run", "tools", "cli", "data"}, path


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("models/vae.py", "from ..run.train import train"),
        ("flows/base.py", "from ..models import priors"),
        ("layers.py", "import vaeflow.flows"),
        ("data/batches.py", "from ..models.bounds import elbo"),
        ("config.py", "from .atomic import atomic_write"),
        ("models/priors.py", "from vaeflow.tools import sweep"),
    ],
)
def test_a_forbidden_import_is_caught(module, line):
    """The checker itself: an upward import added to a module is reported."""
    path = PACKAGE / module
    assert violations(path, path.read_text() + f"\n\ndef _f():\n    {line}\n")
