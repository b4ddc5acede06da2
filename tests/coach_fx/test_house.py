"""The house's rules read from the source tree: no function of ``coach_fx/``, ``passes/`` or
``runtime/`` is over 80 lines; ``passes/`` never imports ``runtime/``, and ``runtime/`` imports
``coach_fx/`` only through its documented deploy interface; each hand-off record has its one
builder; only the deploy layer names a plan directory's files, and a deployment (server, end,
``coach serve``/``run``) loads no compile side. Modules and records have no size limit: a module
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


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute imports, at any depth of the file)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            out.add(n.module)
            out.update(f"{n.module}.{a.name}" for a in n.names)
    return out


def test_passes_never_import_the_runtime():
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("coach_fx.runtime"))
           for p in (ROOT / "passes").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_the_runtime_imports_coach_fx_only_through_the_deploy_interface():
    from coach_fx.runtime import DEPLOY_INTERFACE
    inside = ("coach_fx.runtime", "coach_fx.passes")
    bad = {}
    for p in (ROOT / "runtime").rglob("*.py"):
        found = sorted(m for m in _imports(p) if (m == "coach_fx" or m.startswith("coach_fx."))
                       and not m.startswith(inside) and not m.startswith(DEPLOY_INTERFACE))
        if found:
            bad[str(p.relative_to(ROOT))] = found
    assert not bad


#: record -> the modules that build it (each record's builder, and its own decoder)
BUILDERS = {
    "CutProfile": {"coach_fx/online/deploy.py",   # plan_profile: from an offline Plan
                   "runtime/plans.py"},           # CutProfile.from_json: from a plan directory
    "ReplyStats": {"runtime/cloud.py",            # reply_stats: the cloud's figures for one reply
                   "runtime/wire.py"},            # ReplyStats.of: from the reply's entry
    "OnlinePlans": {"coach_fx/online/__init__.py",    # OnlineModel.online_plans: from its variants
                    "coach_fx/deploy/saved_plan.py"},  # open_plan: from a plan directory
    "SavedPlan": {"coach_fx/deploy/saved_plan.py"},   # open_plan: a plan directory, opened once
    "PlanFiles": {"coach_fx/deploy/saved_plan.py"},   # the verified reader, made only by open_plan
}


def test_each_hand_off_record_is_built_in_one_place():
    from coach_fx.online.deploy import plan_profile          # noqa: F401 - the builders exist
    from coach_fx.runtime.cloud import reply_stats           # noqa: F401
    from coach_fx.runtime.plans import CutProfile
    from coach_fx.runtime.wire import ReplyStats
    from coach_fx.deploy import open_plan                    # noqa: F401
    assert callable(CutProfile.from_json) and callable(ReplyStats.of)
    found: dict[str, set[str]] = {name: set() for name in BUILDERS}
    for p in MODULES + sorted((ROOT / "benchmarks").glob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in BUILDERS:
                found[n.func.id].add(str(p.relative_to(ROOT)))
    for name, where in found.items():
        assert where <= BUILDERS[name], f"{name} is built outside its builders: {sorted(where - BUILDERS[name])}"


#: the names of a plan directory's files: only the deploy layer may name them
PLAN_FILE_NAMES = ("plan.json", "online.json", "manifest.json", "weights.tensors")


def test_only_the_deploy_layer_names_a_plan_directory_s_files():
    found = {}
    for p in MODULES + sorted((ROOT / "benchmarks").glob("*.py")):
        rel = str(p.relative_to(ROOT))
        if rel.startswith("coach_fx/deploy/"):
            continue
        names = {n.value for n in ast.walk(ast.parse(p.read_text()))
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in PLAN_FILE_NAMES}
        if names:
            found[rel] = sorted(names)
    assert not found


def test_a_deployment_loads_no_compile_side(tmp_path):
    """A cloud server, an end, ``coach serve``/``coach run`` and the Ray replicas import no
    optimizer, accuracy oracle, driver or networkx. (Run from an empty folder: ``python -c``
    puts the current folder first on the path, and the source tree is not the package.)"""
    import subprocess
    import sys
    code = ("import sys, coach_fx, coach_fx.runtime.server, coach_fx.runtime.client, coach_fx.deploy, "
            "coach_fx.deploy.cli, coach_fx.cli, coach_fx.runtime.ray_compute; coach_fx.serve; coach_fx.connect; "
            "bad = [m for m in ('networkx', 'scipy', 'coach_fx.optimize', 'coach_fx.accuracy', "
            "'coach_fx.driver', 'coach_fx.compiled') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
