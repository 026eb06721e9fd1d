"""docs/reliability.md and the fault tests agree: every row names a test that exists, and every
test in tests/faults/ has a row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_row_names_a_test_and_every_fault_test_has_a_row() -> None:
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", DOC.read_text()))
    assert named, "docs/reliability.md names no tests"
    for path, name in sorted(named):
        assert name in _tests_in(REPO / path), f"docs/reliability.md names {path}::{name}"
    this_file = Path(__file__).name
    for path in sorted((REPO / "tests" / "faults").glob("test_*.py")):
        if path.name == this_file:
            continue
        relative = str(path.relative_to(REPO))
        for name in sorted(_tests_in(path)):
            assert (relative, name) in named, f"{relative}::{name} has no row in the doc"
