"""The house's one size rule, read from the source tree: no function of ``coach_fx/``,
``passes/`` or ``runtime/`` is over 80 lines. Modules and records have no size limit: a module
is as long as its one role needs and a record has the fields it has (issue #32); a rule about
their sizes only made the tree split by length instead of by role."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p for d in ("coach_fx", "passes", "runtime") for p in (ROOT / d).rglob("*.py"))
MAX_FUNCTION = 80


def test_the_tree_has_modules():
    assert len(MODULES) > 40


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_over_80_lines(path):
    tree = ast.parse(path.read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION} lines: {long}"
