"""Metrics from every stage through Ray's metrics export, in aggregated, pd and epd mode.

One local Ray Serve (the module's cluster) serves each mode in turn: aggregated and pd as separate
stage deployments, epd with Redis — so with role switching, prefill and decode replicas of one
LLMPool deployment. The same six requests go through each: three that finish (two with the same
image), one invalid, one past its deadline and one long stream the client drops while it decodes.
While that one decodes, the export shows it running on its engine with KV blocks held, and the
ingress's own /metrics sees it too (it read 0 before). Afterwards the request counts by final
code, the latency histograms, token counts and each stage's series match what was sent. The epd
app also carries the log check (requests that fail in prefill, over HTTP and gRPC, with and
without a client id, are found by their id in the ingress's, the encoder's and the LLM pool's
logs and in the error returned), a live role switch (instances per role and switch counters),
and the Prometheus-server check (tests/cluster/prometheus_check.py).
"""
import json
import re
import time
import uuid

import grpc
import pytest
import ray
import requests
from ray import serve

from cluster.config import ClusterConfig
from cluster.redis_store import RedisStore
from cluster.registry import Registry
from services.app import build_app
from services.client import build_request
from services.proto import pb_grpc
from tests.cluster.conftest import free_port
from tests.cluster.metrics_scrape import read_events, scrape, total, wait_for, worker_ids
from tests.cluster.prometheus_check import PrometheusServer
from tests.cluster.request_logs import find_in_logs
from tests.cluster.test_redis_serving import png_bytes
from tests.cluster.test_serving_modes import data_url, deploy, wait_registered

pytestmark = pytest.mark.slow
MAX_TOKENS = 8
LONG = 1500            # tokens: the dropped stream decodes for seconds
ROLES = {"aggregated": ["aggregated"], "pd": ["prefill", "decode"], "epd": ["encode", "prefill", "decode"]}


def body(text, images=(), max_tokens=MAX_TOKENS, **extra):
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"model": "", "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


@pytest.fixture(scope="module")
def export(serve_cluster):
    """Ray's metrics export of the (single) node."""
    return f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"


@pytest.fixture(scope="module")
def redis_url():
    from cluster.redis_server import RedisServer
    with RedisServer() as server:
        yield server.url


def send_the_six(base: str, export: str, image, decode_role: str) -> None:
    post = lambda b, **kw: requests.post(f"{base}/v1/chat/completions", json=b, timeout=60, **kw)
    prompt = "describe this picture in great detail please, every part of it " * 3
    for b in (body("hello there"), body(prompt, [image]), body(prompt, [image])):
        assert post(b).status_code == 200
    assert post(body("too long", max_tokens=10**6)).status_code == 400
    assert post(body("a story", max_tokens=LONG), headers={"x-trisect-timeout": "0.3"}).status_code == 504
    with requests.post(f"{base}/v1/chat/completions", json=body("a long story", max_tokens=LONG, stream=True),
                       stream=True, timeout=60) as streamed:
        lines = streamed.iter_lines()
        assert read_events(lines, 3) == 3                     # it streams: tokens decoded
        # it decodes now: the export shows it running on its engine, holding KV blocks
        wait_for(export, lambda s: (total(s, "ray_trisect_engine_running_sequences", role=decode_role) or 0) >= 1
                 and (total(s, "ray_trisect_kv_blocks_used", role=decode_role) or 0) > 0, timeout=20)
        # ... and so does the ingress's own /metrics (its figures are polled from the stages)
        wait_for(f"{base}/metrics", lambda s: (total(s, "trisect_backend_running") or 0) >= 1
                 and (total(s, "trisect_backend_kv_blocks_used") or 0) > 0, timeout=20)
    # the client dropped the stream: nothing runs any more


def check_series(export: str, mode: str, before: set[str]) -> None:
    """After the six: counts by code, histograms, tokens and each stage's series."""
    def settled(s):
        codes = {c: total(s, "ray_trisect_requests_total", before, transport="http", code=c)
                 for c in ("OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED")}
        idle = total(s, "ray_trisect_engine_running_sequences", before, role=ROLES[mode][-1]) == 0
        # every engine lets go of every block: the cut requests were aborted (or released) on each
        # stage, not left to the prefill reaper's 30 s transfer timeout (longer than this wait)
        free = all(total(s, "ray_trisect_kv_blocks_used", before, role=r) == 0 for r in engines)
        done = total(s, "ray_trisect_ingress_in_flight_requests", before) == 0     # sampled: may lag
        return (codes == {"OK": 3, "INVALID_ARGUMENT": 1, "DEADLINE_EXCEEDED": 1, "CANCELLED": 1}
                and idle and free and done and s)
    engines = ["aggregated"] if mode == "aggregated" else ["prefill", "decode"]
    s = wait_for(export, settled, timeout=20)
    fresh = lambda name, **labels: total(s, name, before, **labels)
    for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert fresh(f"ray_trisect_{h}_seconds_count", transport="http") == 3, h
    assert fresh("ray_trisect_completion_tokens_total", transport="http") == 3 * MAX_TOKENS
    for role in ROLES[mode]:
        assert fresh("ray_trisect_instances", role=role) == 1, role
    for role in engines:
        assert fresh("ray_trisect_kv_blocks_free", role=role) > 0, role
        assert fresh("ray_trisect_engine_waiting_sequences", role=role) == 0, role
        assert fresh("ray_trisect_engine_preemptions_total", role=role) == 0, role
    first = ROLES[mode][-2] if mode != "aggregated" else "aggregated"          # where prompts are prefilled
    assert fresh("ray_trisect_prefix_cache_hit_blocks_total", role=first) >= 1    # the repeated prompt
    assert fresh("ray_trisect_prefix_cache_miss_blocks_total", role=first) >= 1
    encoder = {"aggregated": "aggregated", "pd": "prefill", "epd": "encode"}[mode]
    assert fresh("ray_trisect_encode_image_seconds_count", role=encoder) == 2     # one per image sent
    if mode == "epd":
        assert fresh("ray_trisect_mm_cache_misses_total", role="encode") == 1
        assert fresh("ray_trisect_mm_cache_hits_total", role="encode") == 1
        assert fresh("ray_trisect_encode_queue_images", role="encode") == 0
        assert fresh("ray_trisect_redis_round_trip_seconds_count") > 0
        assert fresh("ray_trisect_redis_outages_total") == 0
        assert fresh("ray_trisect_rate_limited_requests_total") == 0
    if mode != "aggregated":
        # every request that reached decode had its KV moved: the 3 finished and the dropped one
        # at least (the one past its deadline may have been cut before or after its transfer)
        assert fresh("ray_trisect_kv_transfer_seconds_count", backend="objectstore") >= 4
        assert fresh("ray_trisect_kv_transfer_bytes_total", backend="objectstore") > 0
        assert fresh("ray_trisect_kv_transfer_failures_total", backend="objectstore") == 0


def deploy_epd(serve_cluster, cache_dir, redis_url: str, grpc_port: int, name: str) -> str:
    """epd with Redis (role switching: one LLMPool of a prefill and a decode replica) and gRPC; the
    SLO controller off, so roles change only when the test asks (as `trisect roles set` does)."""
    cfg = ClusterConfig(model="tiny-llava", mode="epd", cache_dir=str(cache_dir), grpc_port=grpc_port,
                        redis_url=redis_url, kv_cache_memory_mib=32, rate_limit_per_s=1000, rate_limit_burst=1000,
                        role_controller=False)
    assert cfg.switching
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    wait_registered(redis_url, 3)
    return f"{serve_cluster}/{name}"


def fails_in_prefill_and_logs_follow(base: str, app: str, grpc_port: int, image) -> None:
    """Requests that fail in a stage (prefill: more KV than its engine has) are in every stage's
    log that saw them — ingress, encoder, the LLM pool's prefill replica — under their id: the
    client's over HTTP and over gRPC metadata, or the generated one; the error names it."""
    stages = ["Ingress", "EncodeServer", "LLMPool"]
    fail = body("fail in prefill", [image], 3500)
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    r = requests.post(f"{base}/v1/chat/completions", json=fail, headers={"x-request-id": rid}, timeout=60)
    assert r.status_code == 400 and rid in r.json()["error"]["message"], r.text
    r = requests.post(f"{base}/v1/chat/completions", json=fail, timeout=60)      # no id: one is made
    assert r.status_code == 400, r.text
    made = re.search(r"\(request id (\S+)\)", r.json()["error"]["message"]).group(1)
    grpc_rid = f"grpc-{uuid.uuid4().hex[:12]}"
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        call = pb_grpc.GenerationStub(channel).Generate(
            build_request("fail in prefill", images=[png_bytes(image)], max_tokens=3500, temperature=0.0),
            metadata=(("x-request-id", grpc_rid),), timeout=60)
        with pytest.raises(grpc.RpcError) as failed:
            list(call)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and grpc_rid in failed.value.details()
    for an_id in (rid, made, grpc_rid):
        found = find_in_logs(an_id, app, stages)
        assert all(found.values()), json.dumps(found, indent=1)
        # the prefill replica's lines say what failed there
        assert any("KV blocks" in line or "ERROR" in line for line in found["LLMPool"]), found


def switch_roles(redis_url: str, export: str, before: set[str], prometheus) -> None:
    """The pool's prefill replica switches to decode and back: the instances per role and the
    switch counters follow each switch."""
    registry = Registry(RedisStore(redis_url))
    (replica,) = [r.id for r in registry.live("prefill")]
    switched = lambda s: total(s, "ray_trisect_role_switches_total", before, outcome="switched")
    for n, (to, prefills) in enumerate((("decode", 0), ("prefill", 1)), 1):
        registry.request_role(replica, to)
        s = wait_for(export, lambda s: switched(s) == n and total(s, "ray_trisect_instances", before,
                                                                  role="prefill") == prefills and s, timeout=30)
        assert total(s, "ray_trisect_instances", before, role="decode") == 2 - prefills
        assert total(s, "ray_trisect_role_switch_seconds_count", before, outcome="switched") == n
        for outcome in ("cancelled", "failed"):
            assert total(s, "ray_trisect_role_switches_total", before, outcome=outcome) == 0
        if prometheus.proc is not None and n == 1:    # the server has the series before it moves again
            prometheus.wait_for("ray_trisect_role_switch_seconds_count")


@pytest.mark.parametrize("mode", ["aggregated", "pd", "epd"])
def test_every_stage_exports_what_was_sent(serve_cluster, export, trisect_cache, make_image, request, mode):
    before = worker_ids(scrape(export))
    name = f"metrics-{mode}"
    if mode == "epd":
        redis_url, grpc_port = request.getfixturevalue("redis_url"), free_port()
        base = deploy_epd(serve_cluster, trisect_cache, redis_url, grpc_port, name)
    else:
        base = deploy(serve_cluster, mode, "tiny-llava", trisect_cache, name=name)
    prometheus = PrometheusServer(export) if mode == "epd" else None
    try:
        if prometheus and prometheus.proc is not None:     # it scrapes the stages' series from now on
            prometheus.wait_for("ray_trisect_instances")
        started = time.monotonic()
        send_the_six(base, export, make_image(7), ROLES[mode][-1])
        check_series(export, mode, before)
        if mode != "epd":
            return
        fails_in_prefill_and_logs_follow(base, name, grpc_port, make_image(8))
        invalid = lambda s, transport: total(s, "ray_trisect_requests_total", before, transport=transport,
                                             code="INVALID_ARGUMENT")
        wait_for(export, lambda s: invalid(s, "grpc") == 1 and invalid(s, "http") == 3, timeout=15)
        switch_roles(redis_url, export, before, prometheus)
        # one more request, now that the server has every series: each rate and quantile moves
        r = requests.post(f"{base}/v1/chat/completions", json=body("one more", [make_image(9)]), timeout=60)
        assert r.status_code == 200, r.text
        wait_for(export, lambda s: total(s, "ray_trisect_requests_total", before, transport="http", code="OK") == 4)
        # ... and every dashboard query, evaluated by the Prometheus server, returns a number
        results = prometheus.dashboard_results()
        print(f"epd checks {time.monotonic() - started:.1f}s; dashboard queries with data: {len(results)}")
    finally:
        if prometheus:
            prometheus.close()
        serve.delete(name)
