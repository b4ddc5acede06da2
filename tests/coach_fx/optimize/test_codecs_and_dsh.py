"""Image codecs for the model input in the search space, and DADS's heavy-load mode."""

import random

import pytest

from coach_fx.dag import CodecCost
from coach_fx.optimize import Problem, brute_force, coach, solve
from coach_fx.optimize.baselines import dads, dads_dsh
from coach_fx.settings import Network

from .test_coach_exact import BITS, CASES, SetOracle

CODECS = ("jpeg90", "jpeg50", "png")


class CodecOracle(SetOracle):
    """As SetOracle; the input survives jpeg90 and png but never jpeg50."""

    def min_bits(self, end_nodes, allowed=None, codecs=None):
        if codecs and "jpeg50" in codecs.values():
            return None
        return super().min_bits(end_nodes, allowed)


def with_codecs(dag, rng):
    raw = dag.info["x"].numel        # 8-bit raw size of the input
    dag.input_codecs = {"x": {
        "jpeg90": CodecCost("jpeg90", raw // rng.choice([3, 8, 20]), 2e-4, 1e-4, raw // 25),
        "jpeg50": CodecCost("jpeg50", raw // 40, 2e-4, 1e-4, raw // 45),
        "png": CodecCost("png", raw // 2, 5e-4, 2e-4, raw // 2)}}
    return dag


@pytest.mark.parametrize("chunk", range(3))
def test_coach_with_codecs_equals_brute_force_and_beats_jpeg(chunk):
    coded = 0
    for dag, mbps, with_oracle, block_limit, seed in CASES[chunk:90:3]:
        rng = random.Random(seed)
        dag = with_codecs(dag, rng)
        oracle = CodecOracle(dag, rng) if with_oracle else None
        for objective in ("throughput", "latency"):
            p = Problem(dag, Network(mbps, rtt_ms=5), objective, BITS, 8, oracle, ("jpeg90", "png", "jpeg50"))
            want, got = brute_force(p), coach(p, block_limit=block_limit)
            assert got.score == pytest.approx(want.score, rel=1e-9)
            jpeg = solve("cloud-only+jpeg90", p)
            priced = dag.input_codecs["x"]["jpeg90"].priced(objective)
            assert jpeg.codecs == {"x": "jpeg90"} and jpeg.bytes_sent > priced
            assert got.score <= jpeg.score            # never behind the camera's JPEG
            if oracle is not None:
                assert "jpeg50" not in got.codecs.values()   # the oracle refuses it
            coded += bool(got.codecs)
    assert coded > 0     # some plans do send the JPEG


def test_codec_pricing():
    dag, *_ = CASES[0]
    dag = with_codecs(dag, random.Random(0))
    p = Problem(dag, Network(10), "throughput", BITS, 8, None, CODECS)
    raw, jpeg = p.price((), 32, "x"), p.price((), 32, "x", "jpeg90")
    c = dag.input_codecs["x"]["jpeg90"]
    # the codec replaces the 8-bit quantizer: cloud-only's end stage is the encoding alone
    q_end, q_cloud = dag.quant_cost(8)
    n = dag.info["x"].numel
    assert jpeg.t_end == pytest.approx(c.t_end) and raw.t_end == pytest.approx(q_end * n)
    assert jpeg.t_cloud - c.t_cloud == pytest.approx(raw.t_cloud - q_cloud * n)
    assert raw.bytes_sent - jpeg.bytes_sent == dag.info["x"].numel - c.bytes
    from coach_fx.plan import mean_bytes
    assert jpeg.bytes_sent - mean_bytes(dag, jpeg) == c.bytes - c.mean_bytes
    # for latency, one request's expected time: the codec is priced at its mean size
    fast = Problem(dag, Network(10), "latency", BITS, 8, None, CODECS).price((), 32, "x", "jpeg90")
    assert fast.bytes_sent == mean_bytes(dag, fast) == mean_bytes(dag, jpeg) < jpeg.bytes_sent
    # no codec where the input does not cross
    assert p.input_options(dag.nodes) == [None]


def test_cloud_only_codec_refuses_a_non_image_input():
    dag, *_ = CASES[1]
    dag.input_codecs = {}
    with pytest.raises(ValueError, match="not an image"):
        solve("cloud-only+jpeg90", Problem(dag, Network(10)))


def test_dsh_never_worse_than_light_load_cut_for_throughput():
    better = 0
    for dag, mbps, *_ in CASES[:60]:
        p = Problem(dag, Network(mbps, rtt_ms=5), "throughput", BITS, 8, None)
        light, heavy = dads(p), dads_dsh(p)
        assert dag.is_closed(heavy.end_nodes)
        assert all(b == 32 for x, b in heavy.bits.items() if x not in dag.inputs)
        assert heavy.period <= light.period * (1 + 1e-9)
        # the heavy-load cut is a min cut of some weighting: never worse than brute force at 32 bits
        assert heavy.period >= brute_force(p, allowed=(32,)).period * (1 - 1e-9)
        better += heavy.period < light.period * (1 - 1e-6)
    assert better > 0
