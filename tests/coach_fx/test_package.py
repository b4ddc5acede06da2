"""The package the tests import is the one the install says: with the README's development
(editable) install, the working tree these tests belong to; with CI's plain install, the
installed copy (which also tests the packaging: ``passes/`` and ``runtime/`` mapped into
``coach_fx``). And the public names resolve (they are re-exported lazily)."""

import sys
from pathlib import Path

import coach_fx
import coach_fx.passes.ops as ops
import coach_fx.runtime.wire as wire

ROOT = Path(__file__).resolve().parents[2]


def _editable() -> bool:
    """Whether an editable install's import hook serves coach_fx (setuptools' finder)."""
    return any("__editable__" in getattr(f, "__module__", "") and "coach_fx" in f.__module__
               or "__editable__" in getattr(f, "__name__", "") and "coach_fx" in f.__name__
               for f in sys.meta_path)


def test_the_tests_import_the_tree_the_install_points_at():
    here = {m: Path(m.__file__).resolve() for m in (coach_fx, wire, ops)}
    if _editable():
        # pytest and python -m pytest alike: the code being edited, not another copy
        assert here[coach_fx] == ROOT / "coach_fx" / "__init__.py", here
        assert here[wire] == ROOT / "runtime" / "wire.py", here
        assert here[ops] == ROOT / "passes" / "ops.py", here
    else:
        # an installed copy, complete: never the source tree (it has no coach_fx/passes)
        assert all(ROOT not in p.parents for p in here.values()), here
        assert here[wire].parent.parent == here[coach_fx].parent


def test_public_names_resolve():
    for name in coach_fx.__all__:
        assert getattr(coach_fx, name) is not None
    assert set(coach_fx.__all__) <= set(dir(coach_fx))
    try:
        coach_fx.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_every_package_of_the_tree_is_installed():
    """pyproject lists packages by name: a new sub-package must be listed, or a plain install
    (CI, users) lacks it while an editable install (development) hides that."""
    import tomllib
    project = ROOT / "pyproject.toml"
    if not project.is_file():
        return   # an installed copy without its source tree: nothing to compare
    tool = tomllib.loads(project.read_text())["tool"]["setuptools"]
    dirs = {"coach_fx": ROOT / "coach_fx", **{k: ROOT / v for k, v in tool["package-dir"].items()}}
    found = set()
    for name, top in dirs.items():
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top).parts
            found.add(".".join((name, *rel)))
    assert found == set(tool["packages"]), sorted(found ^ set(tool["packages"]))
