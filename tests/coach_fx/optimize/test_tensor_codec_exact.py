"""The lossless tensor codec in the search: coach stays exact (equal to brute force) when every
plan is priced with and without deflate, on random DAGs with random coded sizes."""

import random

import pytest

from coach_fx.dag import CodecCost
from coach_fx.optimize import Problem, brute_force, coach
from coach_fx.passes.wire_sizes import packed_nbytes
from coach_fx.settings import Network

from .test_coach_exact import BITS, CASES, SetOracle


def with_tensor_codec(dag, rng):
    """Random coded shares (10 % .. 120 % of packed: some never pay) and coding times."""
    costs = {}
    for v in dag.nodes:
        d = dag.info[v]
        if not d.quantizable:
            continue
        share = rng.choice([0.1, 0.3, 0.6, 1.2])
        t = rng.choice([1e-5, 1e-4, 1e-3])
        costs[v] = {b: CodecCost("deflate", min(packed_nbytes(d.numel, b), max(1, int(share * packed_nbytes(d.numel, b)))),
                                 t, t / 3, max(1, int(0.8 * share * packed_nbytes(d.numel, b))))
                    for b in BITS if b < 32}
    dag.tensor_codecs = {"deflate": costs}
    return dag


@pytest.mark.parametrize("chunk", range(3))
def test_coach_with_a_tensor_codec_equals_brute_force(chunk):
    coded = 0
    for dag, mbps, with_oracle, block_limit, seed in CASES[chunk:90:3]:
        rng = random.Random(seed)
        dag = with_tensor_codec(dag, rng)
        oracle = SetOracle(dag, rng) if with_oracle else None
        for objective in ("throughput", "latency"):
            p = Problem(dag, Network(mbps, rtt_ms=5), objective, BITS, 8, oracle, (), ("deflate",))
            want, got = brute_force(p), coach(p, block_limit=block_limit)
            assert got.score == pytest.approx(want.score, rel=1e-9)
            plain = coach(Problem(dag, Network(mbps, rtt_ms=5), objective, BITS, 8, oracle))
            assert got.score <= plain.score          # the codec is an option, never a cost
            coded += bool(got.tensor_codecs)
    assert coded > 0
