"""Exact plans for a block too wide to enumerate (DESIGN.md §4, step 3's fallback).

A block with no articulation node and more closed subsets than the divide step will list
(timm's ``convnext_nano``: one block of 226 nodes) is solved as a mixed-integer program by
HiGHS (``scipy.optimize.milp``): a binary ``x_i`` per node (1: on the end) with the
closure constraint ``x_i <= x_p`` on every edge, a crossing indicator ``y_i >= x_i - x_r``
per reader r (and ``y_i >= x_i`` for an output), ``z_j >= 1 - x_r`` per reader of model input
j, and the three stage times of the optimistic price (:class:`LinearPrice`) bounded by the
period. Lexicographic objectives take two solves: the least period, then the least latency
at that period (or the reverse for ``latency``).

:class:`WideBlock` yields the block's plans best-first by that optimistic price, each solve
excluding the plans already yielded (a no-good cut), so the lazy bit search in
``optimize.coach`` runs on top unchanged: it stops as soon as its best resolved plan is no
worse than the next bound, and the answer stays exact.

Example::

    >>> stream = WideBlock(problem, LinearPrice.of(problem), prefix, block)  # doctest: +SKIP
    >>> first, second, mask = next(iter(stream))                             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

if TYPE_CHECKING:
    from coach_fx.optimize.linear_price import LinearPrice
    from coach_fx.optimize.problem import Problem

#: Times enter the program in milliseconds: the solver's absolute tolerances (1e-7 to 1e-9)
#: are then far below any difference between two plans' stage times.
_SCALE = 1e3
#: How far above an optimum a plan may lie in the second solve (relative, and absolute in
#: scaled units): the solver's own feasibility tolerance, so the first optimum stays feasible.
_TOL = 1e-7


class _Rows:
    """Sparse constraint rows ``lo <= A x <= hi`` built one at a time."""

    def __init__(self, nvars: int) -> None:
        self.nvars = nvars
        self.r: list[int] = []
        self.c: list[int] = []
        self.v: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, coef: dict[int, float], lo: float, hi: float) -> None:
        k = len(self.lo)
        for j, a in coef.items():
            if a:
                self.r.append(k)
                self.c.append(j)
                self.v.append(a)
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self) -> LinearConstraint:
        a = coo_matrix((self.v, (self.r, self.c)), shape=(len(self.lo), self.nvars)).tocsr()
        return LinearConstraint(a, np.array(self.lo), np.array(self.hi))


@dataclass(frozen=True)
class Found:
    """One plan of a wide block: its (first, second) objective under the block's price, its
    end set as a bitmask and, where a model input crosses coded, input -> codec."""

    first: float
    second: float
    mask: int
    codecs: Mapping[str, str]


class WideBlock:
    """The plans ``prefix ∪ T`` (T a closed subset of ``block``), best-first by the price
    ``lp`` (optimistic, or exact at one width); ``prefix`` is a bitmask, ``block`` node
    positions in topological order."""

    def __init__(self, p: "Problem", lp: "LinearPrice", prefix: int, block: Sequence[int],
                 time_limit_s: float = 60.0) -> None:
        self.objective = p.objective
        self.block = list(block)
        self.time_limit_s = time_limit_s
        n = len(lp.node.t_end)
        self.n = n
        # variables: x (n), y (n), z (one per input and way it may travel), t
        self.z = [(dag_input, opt.codec, 2 * n + k) for k, (dag_input, opt) in enumerate(
            (x, o) for x, (_, opts) in zip(p.dag.inputs, lp.inputs) for o in opts)]
        self.t = 2 * n + len(self.z)
        nvars = self.t + 1
        lo, hi = np.zeros(nvars), np.ones(nvars)
        inside = set(self.block)
        for i in range(n):                              # outside the block x is fixed
            if i not in inside:
                lo[i] = hi[i] = float(prefix >> i & 1)
        hi[self.t] = np.inf
        self.bounds = Bounds(lo, hi)
        self.integrality = np.zeros(nvars)
        self.integrality[:n] = 1
        self.integrality[2 * n: self.t] = 1             # one way per input: a choice
        rows = _Rows(nvars)
        for r, v in enumerate(p.dag.nodes):
            for q in p.dag.preds(v):
                rows.add({r: 1.0, p.dag.index[q]: -1.0}, -np.inf, 0.0)  # closure: x_r <= x_q
        for i, rs in enumerate(lp.readers):
            for r in rs:
                rows.add({n + i: 1.0, i: -1.0, r: 1.0}, 0.0, np.inf)  # y_i >= x_i - x_r
        for i in lp.outputs:
            rows.add({n + i: 1.0, i: -1.0}, 0.0, np.inf)
        k = 2 * n
        e = {i: float(lp.node.t_end[i]) for i in range(n)}
        cloud = {i: -float(lp.node.t_cloud[i]) for i in range(n)}
        link = {}
        for i in range(n):
            e[n + i] = float(lp.node.cross_end[i])
            cloud[n + i] = float(lp.node.cross_cloud[i])
            link[n + i] = lp.link.up_s_per_byte * float(lp.node.wire[i])
        for rs, opts in lp.inputs:
            ways = range(k, k + len(opts))
            for r in rs:
                rows.add({**{w: 1.0 for w in ways}, r: 1.0}, 1.0, np.inf)   # crosses one way
            for w, opt in zip(ways, opts):
                e[w], cloud[w], link[w] = opt.t_end, opt.t_cloud, lp.link.up_s_per_byte * opt.nbytes
            k += len(opts)
        if inside and max(inside) == n - 1:
            # the end-only plan has no link at all: it is priced apart, not by this program
            rows.add({i: 1.0 for i in self.block}, -np.inf, len(self.block) - 1)
        self.rows = rows
        # stage times as (coefficients over the variables, constant), scaled
        def scaled(coef: dict[int, float]) -> dict[int, float]:
            return {j: _SCALE * a for j, a in coef.items() if a}
        self.stages = ((scaled(e), 0.0), (scaled(link), _SCALE * lp.link.link_fixed),
                       (scaled(cloud), _SCALE * (float(lp.node.t_cloud.sum()) + lp.link.down)))

    def lower_bound(self) -> float:
        """The first objective of the linear relaxation: no plan of the block does better."""
        c, const = self._objective(self.objective == "latency")
        rows = self._with(self._period_rows(None))
        res = milp(c, constraints=rows.constraint(), bounds=self.bounds, options={"presolve": True})
        if res.status != 0:
            return float("inf")
        return (float(res.fun) + const) / _SCALE - 1e-12

    def _objective(self, latency: bool) -> tuple[np.ndarray, float]:
        c = np.zeros(self.rows.nvars)
        if not latency:
            c[self.t] = 1.0
            return c, 0.0
        total, const = self._sum()
        for j, a in total.items():
            c[j] = a
        return c, const

    def _with(self, extra: list[tuple[dict[int, float], float, float]]) -> _Rows:
        rows = _Rows(self.rows.nvars)
        rows.r, rows.c, rows.v = list(self.rows.r), list(self.rows.c), list(self.rows.v)
        rows.lo, rows.hi = list(self.rows.lo), list(self.rows.hi)
        for coef, lo, hi in extra:
            rows.add(coef, lo, hi)
        return rows

    def _solve(self, c: np.ndarray, extra: list[tuple[dict[int, float], float, float]]) -> np.ndarray | None:
        res = milp(c, constraints=self._with(extra).constraint(), integrality=self.integrality,
                   bounds=self.bounds,
                   options={"mip_rel_gap": 0.0, "time_limit": self.time_limit_s, "presolve": True})
        if res.status == 2:        # infeasible: every plan of the block has been yielded
            return None
        if res.x is None or res.status != 0:
            raise RuntimeError(f"coach: the wide-block program did not solve ({res.message}); "
                               "raise the block limit or report the model")
        return res.x

    def _sum(self) -> tuple[dict[int, float], float]:
        total: dict[int, float] = {}
        const = 0.0
        for coef, k in self.stages:
            const += k
            for j, a in coef.items():
                total[j] = total.get(j, 0.0) + a
        return total, const

    def _period_rows(self, cap: float | None) -> list[tuple[dict[int, float], float, float]]:
        """Each stage time <= t (or <= ``cap`` when given)."""
        out = []
        for coef, k in self.stages:
            if cap is None:
                out.append(({**coef, self.t: -1.0}, -np.inf, -k))
            else:
                out.append((coef, -np.inf, cap - k))
        return out

    def __iter__(self) -> Iterator[Found]:
        cuts: list[tuple[dict[int, float], float, float]] = []
        total, const = self._sum()
        c_period, _ = self._objective(False)
        c_latency, _ = self._objective(True)
        periods = self._period_rows(None)
        while True:
            if self.objective == "latency":
                x = self._solve(c_latency, periods + cuts)
                if x is None:
                    return
                first = float(c_latency @ x) + const
                cap = first + _TOL * max(1.0, abs(first))
                x = self._solve(c_period, periods + cuts + [(total, -np.inf, cap - const)])
                second = float(x[self.t])
            else:
                x = self._solve(c_period, periods + cuts)
                if x is None:
                    return
                first = float(x[self.t])
                cap = first + _TOL * max(1.0, abs(first))
                x = self._solve(c_latency, self._period_rows(cap) + periods + cuts)
                second = float(c_latency @ x) + const
            on = [i for i in self.block if x[i] > 0.5]
            mask = sum(1 << i for i in range(self.n) if x[i] > 0.5)
            # no-good cut: the next solve differs from this plan in some node of the block
            cuts.append(({i: (-1.0 if i in on else 1.0) for i in self.block}, 1.0 - len(on), np.inf))
            codecs = {name: codec for name, codec, j in self.z if codec is not None and x[j] > 0.5}
            # bounds, lowered by the solver's tolerance so that the search never stops early
            yield Found((first - _TOL * max(1.0, abs(first))) / _SCALE,
                        (second - _TOL * max(1.0, abs(second))) / _SCALE, mask, codecs)
