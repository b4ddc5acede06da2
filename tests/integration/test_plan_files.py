"""A plan directory whose tensor file was swapped for a 2 GiB sparse one is refused by
``coach_fx.serve`` and ``coach_fx.connect`` before it is read: the process's peak memory grows
by less than 64 MiB (measured in a fresh process, its peak reset after the imports)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.integration.conftest import PLAN_TOKEN

GIB = 1 << 30

PROBE = textwrap.dedent("""
    import json, os, sys
    import coach_fx
    from coach_fx.deploy import ArtifactError

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    def attempt(d):
        refused = {}
        for what, call in (("serve", lambda: coach_fx.serve(d, port=0)),
                           ("connect", lambda: coach_fx.connect(d, "127.0.0.1:9", fallback="error"))):
            try:
                call().close() if what == "connect" else call().stop()
                refused[what] = None
            except ArtifactError as e:
                refused[what] = str(e)
        return refused

    intact = attempt(sys.argv[1])   # the intact plan first: every import and first call is paid
    can_reset = True
    try:   # the peak (VmHWM) back to the current RSS: what follows is measured alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        can_reset = False
    before = kib("VmRSS:")
    refused = attempt(sys.argv[2])
    print(json.dumps({"growth_kib": kib("VmHWM:") - before, "refused": refused, "intact": intact,
                      "reset": can_reset}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_a_2_gib_sparse_tensor_file_is_refused_without_reading_it(plan, tmp_path):
    _, _, d0 = plan
    d = tmp_path / "plan"
    shutil.copytree(d0, d)
    for name in ("cloud.tensors", "end.tensors"):
        os.truncate(d / name, 2 * GIB)          # sparse: no disk, 2 GiB to whoever reads it
    assert (d / "cloud.tensors").stat().st_size == 2 * GIB
    env = {**os.environ, "COACH_TOKEN": PLAN_TOKEN.decode()}
    run = subprocess.run([sys.executable, "-c", PROBE, str(d0), str(d)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print("peak RSS growth while refusing:", out["growth_kib"], "KiB")
    assert out["intact"] == {"serve": None, "connect": None}, out
    for what in ("serve", "connect"):
        assert out["refused"][what] is not None and "lists" in out["refused"][what], out
    assert out["growth_kib"] < 64 * 1024, out
