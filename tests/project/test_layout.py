"""The layout's one rule: the worker side never depends on the web side, and `asyncjobs` (the
shared, public package) on neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, wherever in the module the import is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"), [("jobs", {"app"}), ("asyncjobs", {"app", "jobs"})]
)
def test_lower_layers_do_not_import_higher_ones(package: str, forbidden: set[str]) -> None:
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & forbidden)
        for path in modules
        if imported_packages(path) & forbidden
    }
    assert offenders == {}
