"""The load generator's messages are what a real end sends (only the request id differs), and
its settings refuse what cannot run."""

import pytest
import torch

from coach_fx.runtime.codec import entries_to_payload
from coach_fx.runtime.loadgen import LoadReport, EndRecord, LoadSpec, record, with_request_id
from coach_fx.runtime.wire import decode


def test_recorded_messages_decode_to_the_end_half_s_payload_with_any_request_id(stem_head_split):
    cm, _ = stem_head_split
    frames = [(torch.randn(1, 3, 8, 8),) for _ in range(3)]
    msgs = record(cm, frames)
    assert [decode(m)[0] for m in msgs] == [0, 1, 2]
    again = with_request_id(msgs[1], 12345)
    req, plan, flags, entries = decode(again)              # the checksum still holds
    assert (req, plan, flags) == (12345, 0, 0)
    payload = entries_to_payload(cm.boundary, entries)
    with torch.no_grad():
        assert torch.equal(payload[0], cm.end_module(*frames[1])[0])


@pytest.mark.parametrize("kw", [{"ends": 0}, {"requests": 0}, {"inflight": 0}, {"rate_hz": 0.0}])
def test_a_load_that_cannot_run_is_refused(kw):
    with pytest.raises(ValueError, match="must be"):
        LoadSpec(**kw)


def test_a_report_counts_answers_and_its_quantiles():
    ends = [EndRecord([(k, b"") for k in range(10)], [0.01 * (k + 1) for k in range(10)]) for _ in range(2)]
    report = LoadReport(ends, 2.0)
    assert report.answered == 20 and report.throughput == 10.0
    assert report.p95_s == pytest.approx(0.10)
