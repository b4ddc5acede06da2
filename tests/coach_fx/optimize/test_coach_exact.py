"""COACH equals brute force: random DAGs (seeded) and torchvision models (analytic costs)."""

import random

import pytest

from coach_fx.dag import LayerDAG, NodeData
from coach_fx.optimize import Problem, brute_force, coach, solve
from coach_fx.optimize.baselines import dads, neurosurgeon, qdmp
from coach_fx.settings import Network

BITS = (2, 3, 4, 5, 6, 8, 16, 32)


def random_dag(rng: random.Random, n_max: int) -> LayerDAG:
    """Series segments, parallel branches joined by a concat, residual skips, long skips."""
    preds: dict[str, set[str]] = {}
    order: list[str] = []

    def add(p: set[str]) -> str:
        name = f"n{len(order)}"
        preds[name] = set(p)
        order.append(name)
        return name

    last = add({"x"})
    while len(order) < n_max - 3:
        kind = rng.choice(["chain", "parallel", "residual"])
        if kind == "chain":
            last = add({last})
        elif kind == "parallel":
            ends = []
            for _ in range(rng.randint(2, 3)):
                cur = last
                for _ in range(rng.randint(1, 3)):
                    cur = add({cur})
                ends.append(cur)
            last = add(set(ends))
        else:
            cur = last
            for _ in range(rng.randint(1, 3)):
                cur = add({cur})
            last = add({cur, last})
    if len(order) > 4 and rng.random() < 0.5:   # a long skip connection
        a = rng.randrange(0, len(order) // 2)
        preds[order[-1]].add(order[a])
    nodes = {}
    for v in order:
        t_end = rng.uniform(1e-3, 10e-3)
        numel = rng.choice([500, 2000, 8000, 30000, 100000])
        quant = rng.random() < 0.9
        nodes[v] = NodeData(v, numel, numel * 4, quant, t_end, t_end / rng.uniform(2, 20))
    x = NodeData("x", 50000, 200000, True, 0.0, 0.0)
    return LayerDAG({"x": x}, nodes, preds, {}, [order[-1]], quant_s_per_elem=(1e-8, 2e-9))


class SetOracle:
    """Accuracy depends on the crossing set: each tensor needs at least its own bits."""

    def __init__(self, dag: LayerDAG, rng: random.Random) -> None:
        self.dag = dag
        self.need = {v: rng.choice([2, 3, 4, 6, 8, 16]) for v in dag.nodes}

    def min_bits(self, end_nodes, allowed=None):
        cut = [x for x in self.dag.crossing(end_nodes) if x in self.need and self.dag.info[x].quantizable]
        need = max((self.need[x] for x in cut), default=2)
        ok = [b for b in sorted(allowed) if b >= need]
        return ok[0] if ok else None


def _cases():
    rng = random.Random(1234)
    cases = []
    while len(cases) < 300:
        dag = random_dag(rng, rng.randint(8, 40))
        if not 8 <= len(dag) <= 40 or dag.count_closed_sets(1500) > 1500:
            continue
        cases.append((dag, rng.choice([0.5, 2, 10, 50, 200]), rng.random() < 0.5,
                      rng.choice([4096, 6]), rng.randint(0, 10**6)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("chunk", range(10))
def test_coach_equals_brute_force_on_random_dags(chunk):
    for dag, mbps, with_oracle, block_limit, seed in CASES[chunk::10]:
        assert 8 <= len(dag) <= 40
        oracle = SetOracle(dag, random.Random(seed)) if with_oracle else None
        for objective in ("throughput", "latency"):
            p = Problem(dag, Network(mbps, rtt_ms=5), objective, BITS, 8, oracle)
            want = brute_force(p)
            got = coach(p, block_limit=block_limit)
            assert got.score == pytest.approx(want.score, rel=1e-9), (len(dag), mbps, objective)
            assert dag.is_closed(got.end_nodes)


def test_branch_recursion_prunes_and_stays_exact():
    # with a tiny block limit, blocks are split into branches and Pareto-combined
    from coach_fx.optimize import candidates
    pruned_cases = 0
    for dag, mbps, *_ in CASES[:60]:
        full = dag.count_closed_sets(10**6)
        kept = len(candidates.divide(dag, BITS, exact_sets=False, block_limit=6).masks)
        if kept < full:
            pruned_cases += 1
            p = Problem(dag, Network(mbps), "throughput", BITS, 8, None)
            assert coach(p, block_limit=6).score == pytest.approx(brute_force(p).score, rel=1e-9)
    assert pruned_cases >= 10


MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg11", "googlenet", "densenet121",
          "efficientnet_b0", "vit_b_16"]


@pytest.fixture(scope="module")
def tv_dags():
    pytest.importorskip("torchvision")
    import torch

    from coach_fx.driver import prepare
    from coach_fx.zoo.models import load_model
    from coach_fx.settings import Device, Settings

    out = {}
    for name in MODELS:
        model, shape = load_model(name)
        s = Settings.of(costs="analytic", progress=False, end=Device("end", 8))
        out[name] = prepare(model, (torch.randn(1, *shape),), s)[2]
    return out


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_coach_and_baselines_exact(tv_dags, name):
    dag = tv_dags[name]
    rng = random.Random(name)
    # googlenet has 8838 closed sets: brute force there is most of this test's time, so it is
    # checked at one rate (benchmarks/planner.py checks it again)
    for mbps in (20,) if name == "googlenet" else (2, 20, 200):
        oracle = SetOracle(dag, rng)
        for objective in ("throughput", "latency"):
            p = Problem(dag, Network(mbps), objective, BITS, 8, oracle)
            assert coach(p).score == pytest.approx(brute_force(p).score, rel=1e-9)
        lp = Problem(dag, Network(mbps), "latency", BITS, 8, None)
        f32 = brute_force(lp, allowed=(32,))
        assert dads(lp).latency == pytest.approx(f32.latency, rel=1e-9)
        assert qdmp(lp).latency == pytest.approx(f32.latency, rel=1e-9)
        single = brute_force(lp, allowed=(32,), keep=lambda s: len(dag.crossing(s)) <= 1)
        assert neurosurgeon(lp).latency == pytest.approx(single.latency, rel=1e-9)
        assert solve("dads+int8", lp).latency == pytest.approx(
            brute_force(lp, allowed=(8,)).latency, rel=1e-9)
