"""`trisect bench serve` arithmetic on hand-computed cases: percentiles, per-request TTFT / TPOT /
ITL from chunk timestamps, SLO attainment (failures count as misses), goodput interpolation, and the
seeded trace's determinism and arrival statistics."""
import math

import pytest

from services.bench.serve_metrics import RequestResult, goodput, quantile, summarize
from services.bench.trace import Component, arrival_offsets


def test_quantile_interpolates_between_order_statistics():
    xs = [40, 10, 30, 20]                 # sorted 10 20 30 40; position q·3
    assert quantile(xs, 0.0) == 10
    assert quantile(xs, 0.5) == 25        # 1.5 → halfway between 20 and 30
    assert quantile(xs, 0.9) == pytest.approx(37.0)   # 2.7 → 30 + 0.7·10
    assert quantile(xs, 0.99) == pytest.approx(39.7)  # 2.97
    assert quantile(xs, 1.0) == 40
    assert quantile([7.0], 0.99) == 7.0
    assert math.isnan(quantile([], 0.5))
    with pytest.raises(ValueError):
        quantile(xs, 1.5)


def test_request_timings_from_chunk_timestamps():
    # sent at 10.0; chunks at 10.2, 10.25, 10.35, 10.40; stream closed at 10.41; 4 tokens
    r = RequestResult(sent=10.0, chunk_times=[10.2, 10.25, 10.35, 10.40], end=10.41, output_tokens=4)
    assert r.ok
    assert r.ttft == pytest.approx(0.2)
    assert r.itl == pytest.approx([0.05, 0.10, 0.05])
    assert r.e2e == pytest.approx(0.41)
    assert r.tpot == pytest.approx((0.41 - 0.2) / 3)
    # a server that packs two tokens into a chunk: TPOT divides by the usage count, ITL stays per chunk
    packed = RequestResult(sent=0.0, chunk_times=[1.0, 1.4], end=1.4, output_tokens=5)
    assert packed.tpot == pytest.approx(0.1)
    assert packed.itl == pytest.approx([0.4])
    assert RequestResult(sent=0.0, chunk_times=[0.3], end=0.3, output_tokens=1).tpot == 0.0
    with pytest.raises(ValueError):
        RequestResult(sent=0.0, chunk_times=[2.0, 1.0])


def test_summary_attainment_counts_failures_as_misses():
    fast = RequestResult(sent=0.0, chunk_times=[0.1, 0.12, 0.14], end=0.14, output_tokens=3)  # 100 / 20 ms
    slow_first = RequestResult(sent=0.0, chunk_times=[0.6, 0.61], end=0.61, output_tokens=2)  # 600 / 10 ms
    slow_decode = RequestResult(sent=1.0, chunk_times=[1.1, 1.2, 1.3], end=1.3, output_tokens=3)  # 100 / 100 ms
    failed = RequestResult(sent=0.0, error="HTTP 503: overloaded")
    s = summarize([fast, slow_first, slow_decode, failed], duration_s=2.0, rate=4.0, concurrency=None,
                  slo_ttft_ms=500, slo_tpot_ms=50)
    assert (s.completed, s.failed) == (3, 1)
    assert s.slo_attainment == pytest.approx(1 / 4)          # only `fast` meets both
    assert s.request_throughput == pytest.approx(1.5)         # 3 done in 2 s
    assert s.output_throughput == pytest.approx(4.0)          # 8 tokens in 2 s
    assert s.latency_ms["ttft"]["p50"] == pytest.approx(100.0)
    assert s.latency_ms["ttft"]["p90"] == pytest.approx(500.0)   # 100 100 600: pos 1.8 → 100 + 0.8·500
    assert s.latency_ms["tpot"]["mean"] == pytest.approx((20 + 10 + 100) / 3)
    # pooled gaps 20 20 10 100 100 ms → p50 20
    assert s.latency_ms["itl"]["p50"] == pytest.approx(20.0)
    assert s.errors == ["HTTP 503: overloaded"]
    assert s.x == 4.0
    unbounded = summarize([fast], duration_s=0.5, rate=math.inf, concurrency=None, slo_ttft_ms=500, slo_tpot_ms=50)
    assert unbounded.x == pytest.approx(2.0)                  # plotted at what it achieved


def test_goodput_interpolates_at_the_crossing():
    # 2 → 100%, 4 → 95%, 8 → 75%: the line from (4, .95) to (8, .75) crosses .90 at 4 + 4·.05/.20 = 5
    assert goodput([(8, 0.75), (2, 1.0), (4, 0.95)]) == (pytest.approx(5.0), "interpolated")
    assert goodput([(2, 1.0), (4, 0.9), (8, 0.5)]) == (4.0, "interpolated")   # exactly at target
    assert goodput([(2, 1.0), (4, 0.99)]) == (4.0, "at least")
    assert goodput([(2, 0.5), (4, 0.2)]) == (0.0, "below")
    # non-monotone: the highest passing rate counts (here 8, crossing towards 16 at 8 + 8·.02/.22)
    g, how = goodput([(2, 0.8), (4, 0.95), (8, 0.92), (16, 0.70)])
    assert how == "interpolated" and g == pytest.approx(8 + 8 * 0.02 / 0.22)


def test_arrivals_are_seeded_poisson_and_unbounded_is_all_at_once():
    a = arrival_offsets(4000, rate=8.0, seed=3)
    assert a == arrival_offsets(4000, rate=8.0, seed=3)
    assert a != arrival_offsets(4000, rate=8.0, seed=4)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert mean == pytest.approx(1 / 8, rel=0.05)
    assert cv == pytest.approx(1.0, abs=0.07)                 # exponential gaps: std = mean
    b = arrival_offsets(4000, 8.0, burstiness=0.25, seed=3)      # gamma k = 1/4: CV = 1/√k = 2
    bg = [y - x for x, y in zip(b, b[1:])]
    bmean = sum(bg) / len(bg)
    assert bmean == pytest.approx(1 / 8, rel=0.1)
    assert math.sqrt(sum((g - bmean) ** 2 for g in bg) / len(bg)) / bmean == pytest.approx(2.0, rel=0.1)
    assert arrival_offsets(5, math.inf) == [0.0] * 5


def test_trace_is_seeded_and_hits_the_asked_lengths(tiny_llava):
    from services.bench.trace import MIXES, build_trace
    tok = tiny_llava.tokenizer
    a = build_trace(MIXES["random-text"], 6, seed=1, tokenizer=tok)
    assert a == build_trace(MIXES["random-text"], 6, seed=1, tokenizer=tok)
    assert a != build_trace(MIXES["random-text"], 6, seed=2, tokenizer=tok)
    lens = [len(tok.encode(r.prompt, add_special_tokens=False)) for r in a]
    assert all(abs(n - 256) <= 2 for n in lens), lens
    assert all(r.output_len == 64 and not r.images for r in a)
    heavy = build_trace(MIXES["image-heavy"], 8, seed=1, tokenizer=tok)
    assert all(2 <= len(r.images) <= 6 for r in heavy)
    assert all(img.startswith(b"\x89PNG") for r in heavy for img in r.images)
    with pytest.raises(ValueError):
        Component(1, 10, 10, images=(3, 1))
