"""The house's size rules (issue #14), read from the source tree: every module of
``coach_fx/``, ``passes/`` and ``runtime/`` is at most 400 lines, no function is over 80
lines, and no constructor takes over 8 parameters (a record's fields are its constructor's)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p for d in ("coach_fx", "passes", "runtime") for p in (ROOT / d).rglob("*.py"))
MAX_LINES, MAX_FUNCTION, MAX_PARAMS = 400, 80, 8


def _is_record(node: ast.ClassDef) -> bool:
    def name(d: ast.expr) -> str:
        d = d.func if isinstance(d, ast.Call) else d
        return d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "")
    return any(name(d) == "dataclass" for d in node.decorator_list) \
        or any(name(b) == "NamedTuple" for b in node.bases)


def _constructors(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        if _is_record(node):
            fields = [s for s in node.body if isinstance(s, ast.AnnAssign)
                      and not ast.unparse(s.annotation).startswith(("ClassVar", "typing.ClassVar"))]
            out.append((node.name, len(fields)))
        for s in node.body:
            if isinstance(s, ast.FunctionDef) and s.name == "__init__":
                out.append((f"{node.name}.__init__", len(s.args.args) - 1 + len(s.args.kwonlyargs)))
    return out


def test_the_tree_has_modules():
    assert len(MODULES) > 40


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_function_and_constructor_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: over {MAX_LINES} lines"
    tree = ast.parse(text)
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION} lines: {long}"
    wide = [f"{name} ({k})" for name, k in _constructors(tree) if k > MAX_PARAMS]
    assert not wide, f"{path.name}: constructors over {MAX_PARAMS} parameters: {wide}"
