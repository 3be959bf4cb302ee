"""The metrics catalogue follows Prometheus conventions, the dashboard and docs/metrics.md cover
exactly it, and request ids are taken, validated, bound and logged as services/request_log.py says."""
import asyncio
import io
import json
import logging
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from cluster import metrics as m
from services import request_log
from services.api_types import ChatMessage, ContentPart, GenerateRequest

ROOT = Path(__file__).resolve().parents[2]


def test_names_units_and_labels_follow_prometheus_conventions():
    names = [s.name for s in m.CATALOGUE]
    assert len(names) == len(set(names))
    for s in m.CATALOGUE:
        assert re.fullmatch(r"trisect_[a-z0-9_]+", s.name), s.name
        assert (s.kind == "counter") == s.name.endswith("_total"), s.name
        if s.kind == "histogram":
            assert s.name.endswith("_seconds"), s.name
        assert set(s.labels) <= {"role", "replica", "transport", "code", "backend", "outcome"}, s.name
    with pytest.raises(ValueError):
        m.Series("counter", "trisect_bad_total", "x", ("request_id",))
    with pytest.raises(ValueError):
        m.Series("gauge", "trisect_bad_total", "x")


def test_dashboard_queries_only_catalogued_series_and_docs_list_them_all():
    dashboard = json.loads((ROOT / "helm/trisect/dashboards/trisect-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"ray_(trisect_[a-z0-9_]+)", e)}
    catalogue = {s.name for s in m.CATALOGUE}
    assert used <= catalogue, used - catalogue
    assert catalogue - used == set(), "every series has a panel"
    docs = (ROOT / "docs/metrics.md").read_text()
    assert all(f"`{n}`" in docs for n in catalogue)


def test_series_check_labels_and_counters_exist_from_zero():
    s = m.Series("counter", "trisect_unit_test_events_total", "test", ("role",))
    with pytest.raises(ValueError, match="labels"):
        s.inc(role="x", replica="y")
    s.inc(0, role="decode")
    assert 'trisect_unit_test_events_total{role="decode"} 0.0' in generate_latest(m.REGISTRY).decode()
    s.inc(2, role="decode")
    assert 'trisect_unit_test_events_total{role="decode"} 2.0' in generate_latest(m.REGISTRY).decode()


def test_request_ids_are_taken_validated_and_bound():
    async def one(header):
        rid = request_log.incoming(header)
        return rid, request_log.current(), request_log.with_id("bad max_tokens")
    rid, bound, message = asyncio.run(one("trace-42"))
    assert rid == bound == "trace-42" and message == "bad max_tokens (request id trace-42)"
    for bad in ("has space", "x" * 200, "", None, "tab\there"):
        rid, bound, _ = asyncio.run(one(bad))
        assert rid == bound and re.fullmatch(r"[0-9a-f]{32}", rid), bad
    req = GenerateRequest(request_id="generated", messages=(ChatMessage("user", (ContentPart("text", "hi"),)),))
    assert request_log.adopt(req, [("X-Request-Id", "from-metadata")]).request_id == "from-metadata"
    assert request_log.adopt(req, [("x-request-id", "bad id")]).request_id == "generated"


def test_log_lines_carry_the_request_id_as_text_or_json():
    out = io.StringIO()
    logger = logging.getLogger("services.unit_test_request_log")
    for json_logs in (False, True):
        request_log.setup(json_logs=json_logs)
        for h in logging.getLogger("services").handlers:
            h.setStream(out)

        async def serve():
            request_log.incoming("trace-7")
            logger.warning("prefill failed")
        asyncio.run(serve())
    text, js = out.getvalue().strip().splitlines()[-2:]
    assert "[trace-7] prefill failed" in text
    assert json.loads(js)["request_id"] == "trace-7" and json.loads(js)["message"] == "prefill failed"
    for name in request_log.PACKAGES:                 # leave logging as other tests expect it
        logging.getLogger(name).handlers, logging.getLogger(name).propagate = [], True


def test_engine_sampler_follows_a_role_switch_without_counting_twice():
    """A role-switching replica's series move to its new role: old gauges 0, counters go on."""
    from types import SimpleNamespace

    from services import stage_metrics
    bm = SimpleNamespace(num_free_blocks=6, num_usable_blocks=10, prefix_hits=3, prefix_misses=5)
    engine = SimpleNamespace(block_manager=bm, scheduler=SimpleNamespace(waiting=[], running=[1, 2],
                                                                         num_preemptions=0))
    owner = SimpleNamespace(role="prefill")
    sampler = stage_metrics.watch_engine(engine, lambda: owner.role, "unit-switch", interval_s=3600)
    sampler.close()                                   # one sample taken at start; the rest by hand
    text = lambda: generate_latest(m.REGISTRY).decode()
    line = lambda name, role: f'{name}{{replica="unit-switch",role="{role}"}}'
    assert f'{line("trisect_engine_running_sequences", "prefill")} 2.0' in text()
    assert f'{line("trisect_prefix_cache_hit_blocks_total", "prefill")} 3.0' in text()
    owner.role, bm.prefix_hits = "decode", 4
    sampler.sample()
    out = text()
    for gauge in ("trisect_instances", "trisect_engine_running_sequences", "trisect_kv_blocks_used"):
        assert f'{line(gauge, "prefill")} 0.0' in out, gauge
    assert f'{line("trisect_instances", "decode")} 1.0' in out
    assert f'{line("trisect_kv_blocks_used", "decode")} 4.0' in out
    assert f'{line("trisect_prefix_cache_hit_blocks_total", "prefill")} 3.0' in out
    assert f'{line("trisect_prefix_cache_hit_blocks_total", "decode")} 1.0' in out    # 4 in all, not 7
    assert f'{line("trisect_prefix_cache_miss_blocks_total", "decode")} 0.0' in out   # exists from 0
