"""The documentation stays true: docstring examples run, the README's flow table lists
exactly the registered flows, and references point at documents in the repository."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import vaeflow
from vaeflow.flows.registry import FLOWS

ROOT = Path(__file__).resolve().parents[1]
# vaeflow.__main__ runs the CLI when imported.
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(vaeflow.__path__, prefix="vaeflow.")
    if m.name != "vaeflow.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} docstring example(s) failed"


def test_some_docstring_examples_exist() -> None:
    """The test above must not pass vacuously."""
    finder = doctest.DocTestFinder()
    examples = sum(
        len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name))
    )
    assert examples >= 4


def test_readme_flow_table_lists_exactly_the_registered_flows() -> None:
    text = (ROOT / "README.md").read_text()
    table = re.findall(r"^\| `([a-z0-9_]+)` \| (?:vector|image) \|", text, flags=re.M)
    assert sorted(table) == sorted(FLOWS), (
        "README.md's flow table and vaeflow.flows.registry.FLOWS differ: "
        f"only in README {sorted(set(table) - set(FLOWS))}, "
        f"only registered {sorted(set(FLOWS) - set(table))}"
    )
    assert len(table) == len(set(table)), "a flow is listed twice"


def test_references_point_into_the_repository() -> None:
    """Code and docs cite docs/design.md, which exists; never documents outside the repo
    (DESIGN.md / STYLE.md were the steering team's notes, not part of the repository)."""
    assert (ROOT / "docs" / "design.md").is_file()
    offenders = []
    for path in [*ROOT.glob("vaeflow/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("*.md")]:
        if path.name == "test_docs.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(DESIGN|STYLE)\.md\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert not offenders, f"references to documents outside the repository: {offenders}"
