"""Request journal (what migration reads back) and per-API-key rate limits, on a real Redis."""
import time

import pytest

from cluster.redis_store import StoreError


def test_journal_round_trip(store):
    store.journal_open("r1", "routed", meta={"prompt_tokens": 12, "model": "tiny-llava"},
                       assignment={"prefill": "p0", "decode": "d1", "encoders": ["e0"]})
    assert store.journal_update("r1", state="decoding")
    assert store.journal_append("r1", 0, [5, 6, 7]) == 3
    assert store.journal_append("r1", 3, [8]) == 4
    assert store.journal_append("r1", 3, [8]) == 4                   # retried append: no duplicate
    assert store.journal_append("r1", 2, [7, 8, 9, 10]) == 6          # overlap: only the tail added
    with pytest.raises(StoreError, match="gap"):
        store.journal_append("r1", 9, [1])
    assert store.journal_update("r1", assignment={"prefill": "p0", "decode": "d0", "encoders": ["e0"]})
    e = store.journal_read("r1")
    assert (e.state, e.tokens, e.assignment["decode"], e.meta["model"]) == (
        "decoding", [5, 6, 7, 8, 9, 10], "d0", "tiny-llava")
    assert e.created_ms <= e.updated_ms


def test_journal_expires(store):
    assert store.journal_read("nope") is None
    assert not store.journal_update("nope", state="x")
    assert store.journal_append("nope", 0, [1]) == -1
    store.journal_open("r2", "routed")
    store.journal_append("r2", 0, [1, 2])
    assert store.journal_close("r2", "finished", keep_s=0.2)
    assert store.journal_read("r2").state == "finished"
    time.sleep(0.3)
    assert store.journal_read("r2") is None


def test_rate_limit_refuses_n_plus_first_with_retry_after(store):
    n, window_s = 5, 10.0                     # 5 requests per 10 s: refill 0.5 token/s
    got = [store.rate_limit("key-A", capacity=n, refill_per_s=n / window_s) for _ in range(n + 1)]
    assert all(d.allowed for d in got[:n])
    refused = got[n]
    assert not refused.allowed
    assert 1.0 < refused.retry_after_s <= 2.0  # one token takes 2 s to refill
    assert store.rate_limit("key-B", capacity=n, refill_per_s=n / window_s).allowed   # per key
    with pytest.raises(ValueError):
        store.rate_limit("key-A", capacity=1, refill_per_s=1, cost=2)


def test_rate_limit_refills(store):
    for _ in range(2):
        assert store.rate_limit("k", capacity=2, refill_per_s=20).allowed
    d = store.rate_limit("k", capacity=2, refill_per_s=20)
    assert not d.allowed and 0 < d.retry_after_s <= 0.05
    time.sleep(d.retry_after_s + 0.01)
    assert store.rate_limit("k", capacity=2, refill_per_s=20).allowed
