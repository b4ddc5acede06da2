import math

import pytest

from coach_fx.dag import LayerDAG, NodeData
from coach_fx.plan import evaluate
from coach_fx.passes.wire_sizes import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES, tensor_bytes
from coach_fx.settings import Network


def chain():
    nodes = {"a": NodeData("a", 1000, 4000, True, 0.010, 0.001),
             "b": NodeData("b", 100, 400, True, 0.020, 0.002)}
    return LayerDAG({"x": NodeData("x", 3000, 12000, True, 0, 0)}, nodes,
                    {"a": {"x"}, "b": {"a"}}, {}, ["b"])


def test_formulas():
    dag = chain()
    net = Network(uplink_mbps=8, downlink_mbps=4, rtt_ms=10)
    p = evaluate(dag, {"a"}, {"a": 4}, net)
    sent = math.ceil(1000 * 4 / 8) + TENSOR_HEADER_BYTES + MESSAGE_HEADER_BYTES
    assert p.cut == ("a",) and p.bytes_sent == sent
    assert p.t_end == pytest.approx(0.010)
    assert p.t_link == pytest.approx(sent * 8 / 8e6 + 0.005)
    assert p.t_cloud == pytest.approx(0.002 + (400 + MESSAGE_HEADER_BYTES) * 8 / 4e6 + 0.005)
    assert p.latency == pytest.approx(p.t_end + p.t_link + p.t_cloud)
    assert p.period == max(p.t_end, p.t_link, p.t_cloud)
    assert p.throughput == pytest.approx(1 / p.period)
    assert p.bubble_ratio == pytest.approx(1 - p.latency / (3 * p.period))


def test_end_only_sends_nothing_and_closure_checked():
    dag = chain()
    p = evaluate(dag, {"a", "b"}, 8, Network(10))
    assert p.cut == () and p.t_link == 0 and p.t_cloud == 0 and p.bubble_ratio == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="closed"):
        evaluate(dag, {"b"}, 8, Network(10))


def test_tensor_bytes():
    assert tensor_bytes(10, 40, True, 3) == 4 + TENSOR_HEADER_BYTES
    assert tensor_bytes(10, 40, True, 16) == 20 + TENSOR_HEADER_BYTES
    assert tensor_bytes(10, 80, False, 4) == 80 + TENSOR_HEADER_BYTES


def test_link_efficiency_prices_the_payload_share_of_the_rate():
    dag = chain()
    full = evaluate(dag, {"a"}, 8, Network(8))
    tcp = evaluate(dag, {"a"}, 8, Network(8, efficiency=0.5))
    assert tcp.t_link == pytest.approx(2 * full.t_link)
    with pytest.raises(ValueError, match="efficiency"):
        Network(8, efficiency=0)
