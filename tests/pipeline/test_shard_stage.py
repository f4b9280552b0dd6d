"""The shard-stage skeleton stages 1 and 2 share: one accounting, one result, old field names read."""

from __future__ import annotations

import pytest

from pipeline.core.shards import plan_shards
from pipeline.data.records import Rejection, reason_key
from pipeline.data.shard_stage import entry_rejections, result_of, shard_accounting

REJECTIONS = [Rejection(3, 4, "in.jsonl", "a", "conversations[0].content[1].audio", "/x/a.flac: silence (rms 0)"),
              Rejection(4, 5, "in.jsonl", "b", "conversations[2].content[0].audio", "/x/b.flac: silence (rms 0)"),
              Rejection(5, 6, "in.jsonl", "c", "engine", "timeout")]


def test_accounting_counts_by_reason_and_refuses_counts_that_do_not_add_up():
    shard = plan_shards(20, 2)[0]  # 10 records
    rows = [r.to_dict() for r in REJECTIONS]
    counts = shard_accounting(shard, 7, rows)
    assert (counts["input_records"], counts["accepted"], counts["rejected"]) == (10, 7, 3)
    assert counts["rejected_by_reason"] == {reason_key(rows[0]): 2, reason_key(rows[2]): 1}
    result = result_of(shard, counts, tokens=99, seconds=1.5)
    assert (result.accepted + result.rejected, result.tokens, sum(result.reasons.values())) == (len(shard), 99, 3)
    with pytest.raises(RuntimeError, match=r"shard-00000-of-00002: 8 accepted \+ 3 rejected != 10 input records"):
        shard_accounting(shard, 8, rows)


def test_entries_of_the_previous_release_are_read():
    assert entry_rejections({"rejected_by_field": {"audio": 2}}) == {"audio": 2}
    assert entry_rejections({"rejected_by_reason": {"audio: silence": 2}}) == {"audio: silence": 2}
    assert entry_rejections({}) == {}
