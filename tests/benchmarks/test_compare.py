"""Smoke test of the comparison grid: ``benchmarks/compare.py --quick`` runs and holds its claims."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_grid_runs_and_coach_is_never_behind(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--no-real",
                          "--out", str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT compare:")]
    assert line, out.stdout[-2000:]
    kv = dict(re.findall(r"(\w+)=([^\s]+)", line[0]))
    assert float(kv["min_throughput_ratio"]) >= 0.99
    assert float(kv["geomean_throughput_gain"]) >= 1.0
    assert (tmp_path / "compare.csv").read_text().count("\n") == int(kv["cells"]) + 1
    assert "## Headline" in (tmp_path / "RESULTS.md").read_text()
