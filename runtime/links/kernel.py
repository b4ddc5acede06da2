"""A real, kernel-shaped link for experiments and tests: two network namespaces (the end's and
the cloud's) joined by a veth pair, the end's egress (the uplink) shaped by ``tc qdisc tbf``,
its rate changed at every sample of a bandwidth trace while a thread replays it in real time.
Real TCP streams between the namespaces then see the recorded bandwidth.

Needs root and iproute2 (``ip``, ``tc``); :func:`kernel_link_unavailable` says why not where
it cannot run. Everything it creates is removed on exit, whatever happened.

Example::

    >>> with ShapedLink(Trace.load("norway_bus_20", scale=1.5)) as link:      # doctest: +SKIP
    ...     cloud = subprocess.Popen(link.run_in("cloud", ["coach", "serve", "plan", "--host", link.cloud_ip]))
    ...     link.replay()                       # the rate now follows the trace
    ...     end = subprocess.run(link.run_in("end", ["coach", "run", "plan", "--host", link.cloud_ip]))
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Sequence

from coach_fx.runtime.traces import Trace

#: tbf's bucket and queue: a 32 kbit burst and 50 ms of queue at the current rate, the
#: figures ``tests/integration/test_tbf.py`` measured goodput with (``TCP_EFFICIENCY``).
TBF_BURST = "32kbit"
TBF_LATENCY = "50ms"
#: the slowest rate tbf is set to: a trace's outage (0 Mbit/s) becomes this trickle
MIN_RATE_KBIT = 8


def kernel_link_unavailable() -> str | None:
    """Why a shaped veth link cannot be built here (None: it can be tried)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces and tc"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class ShapedLink:
    """The two namespaces and the shaped veth pair between them (a context manager).

    ``end_ip``/``cloud_ip`` are their addresses; :meth:`run_in` prefixes a command to run it in
    one namespace; :meth:`set_rate` changes the uplink's rate now; :meth:`replay` follows
    ``trace`` from now on (looping), on a thread, until the link is closed."""

    def __init__(self, trace: Trace, tag: str | None = None, subnet: str = "10.211.78") -> None:
        tag = tag or str(os.getpid() % 100000)
        self.trace = trace
        self.ns = {"end": f"coach_e{tag}", "cloud": f"coach_c{tag}"}
        self.dev = {"end": f"ve{tag}", "cloud": f"vc{tag}"}
        self.end_ip, self.cloud_ip = f"{subnet}.1", f"{subnet}.2"
        self.changes: list[tuple[float, float]] = []    # (monotonic time, Mbit/s) as set
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ShapedLink":
        why = kernel_link_unavailable()
        if why:
            raise RuntimeError(why)
        try:
            for ns in self.ns.values():
                _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", self.dev["end"], "type", "veth", "peer", "name", self.dev["cloud"])
            for side, ip in (("end", self.end_ip), ("cloud", self.cloud_ip)):
                _sh("ip", "link", "set", self.dev[side], "netns", self.ns[side])
                _sh(*self._in(side), "ip", "addr", "add", f"{ip}/30", "dev", self.dev[side])
                _sh(*self._in(side), "ip", "link", "set", self.dev[side], "up")
                _sh(*self._in(side), "ip", "link", "set", "lo", "up")
            self._tbf("add", self.trace.rate_at(0.0))
        except subprocess.CalledProcessError as e:
            self.close()
            raise RuntimeError(f"cannot build a shaped veth link here: {e.stderr.strip() or e}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_in(self, side: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run in the ``"end"`` or ``"cloud"`` namespace."""
        return [*self._in(side), *cmd]

    def set_rate(self, mbps: float) -> None:
        self._tbf("change", mbps)

    def replay(self) -> None:
        """Follow the trace from now: each sample's rate at its time (a thread)."""
        self._thread = threading.Thread(target=self._follow, daemon=True, name="coach-tbf")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # ------------------------------------------------------------------ inside
    def _in(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]]

    def _tbf(self, verb: str, mbps: float) -> None:
        kbit = max(MIN_RATE_KBIT, int(mbps * 1000))
        _sh(*self._in("end"), "tc", "qdisc", verb, "dev", self.dev["end"], "root", "tbf",
            "rate", f"{kbit}kbit", "burst", TBF_BURST, "latency", TBF_LATENCY)
        self.changes.append((time.monotonic(), mbps))

    def _follow(self) -> None:
        tr, t0, k = self.trace, time.monotonic(), 0
        while not self._stop.is_set():
            loop, i = divmod(k, len(tr.times))
            at = t0 + loop * tr.duration + tr.times[i]
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            try:
                self.set_rate(tr.mbps[i])
            except subprocess.CalledProcessError:   # the namespace is going away
                return
            k += 1
            if tr.duration == float("inf") and k >= len(tr.times):
                return


__all__ = ["MIN_RATE_KBIT", "ShapedLink", "kernel_link_unavailable"]
