"""The wide-block program (``optimize.milp``): the exact answer where listing cannot run."""

import random

import pytest

from coach_fx.optimize import Problem, brute_force, coach
from coach_fx.optimize.candidates import divide
from coach_fx.optimize.coach import LinearPrice, optimistic_scores
from coach_fx.optimize.milp import WideBlock
from coach_fx.settings import Network

from .test_coach_exact import BITS, CASES, SetOracle


@pytest.mark.parametrize("chunk", range(4))
def test_every_block_left_to_the_program_still_equals_brute_force(chunk):
    # program_limit=0 lists nothing: every block with nodes is solved by the program
    wide = 0
    for dag, mbps, with_oracle, _, seed in CASES[chunk:120:4]:
        oracle = SetOracle(dag, random.Random(seed)) if with_oracle else None
        for objective in ("throughput", "latency"):
            p = Problem(dag, Network(mbps, rtt_ms=5), objective, BITS, 8, oracle)
            got = coach(p, program_limit=0)
            wide += got.extra["wide_blocks"]
            assert got.score == pytest.approx(brute_force(p).score, rel=1e-9), (len(dag), mbps, objective)
            assert dag.is_closed(got.end_nodes)
    assert wide >= 30


def test_the_program_yields_every_plan_of_a_block_best_first_each_once_at_its_true_price():
    dag, mbps, *_ = next(c for c in CASES if 12 <= len(c[0]) <= 16 and divide(c[0], BITS, False, program_limit=0).wide)
    p = Problem(dag, Network(mbps, rtt_ms=5), "throughput", BITS, 8, None)
    division = divide(dag, BITS, exact_sets=False, program_limit=0)
    n = len(dag.nodes)
    full = (1 << n) - 1
    closed = [sum(1 << dag.index[v] for v in s) for s in dag.closed_sets()]
    for prefix, block in division.wide:
        for lp, width in ((LinearPrice.optimistic(p), None), (LinearPrice.exact(p, 4), 4)):
            got = list(WideBlock(p, lp, prefix, block))
            masks = [f.mask for f in got]
            inside = prefix | sum(1 << i for i in block)
            # every closed set between the prefix and the block's end, once; the end-only
            # plan is priced apart
            want = {m for m in closed if m & prefix == prefix and m & ~inside == 0 and m != full}
            assert sorted(masks) == sorted(want)
            keys = [(f.first, f.second) for f in got]
            assert keys == sorted(keys)
            if width is None:
                first, second = optimistic_scores(p, masks, lp)
            else:
                scores = [p.price([dag.nodes[i] for i in range(n) if m >> i & 1], width, "t").score
                          for m in masks]
                first, second = [f for f, _ in scores], [s for _, s in scores]
            for f, a, b in zip(got, first, second):
                assert f.first <= a and f.first == pytest.approx(a, rel=1e-6, abs=1e-9)
                assert f.second == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_a_search_out_of_time_returns_its_best_plan_marked_unproven():
    def problems():  # noqa: ANN202
        for dag, mbps, *_ in CASES:
            p = Problem(dag, Network(mbps, rtt_ms=5), "throughput", BITS, 8, SetOracle(dag, random.Random(1)))
            if coach(p).extra["resolved"] >= 3:       # a search that takes more than one step
                yield p
    p = next(problems())
    got = coach(p, time_limit_s=0.0)
    want = brute_force(p)
    assert got.extra["proven"] is False and 0 <= got.extra["gap"] < 1
    assert got.score >= want.score                     # a real plan, perhaps not the best
    assert "proven" not in coach(p).extra
