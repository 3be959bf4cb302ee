"""Metrics from every stage through Ray's metrics export, in aggregated, pd and epd mode.

One local Ray Serve (the module's cluster) serves each mode in turn. The same six requests go
through each: three that finish (two with the same image), one invalid, one past its deadline and
one long stream the client drops while it decodes. While that one decodes, the export shows it
running on its engine with KV blocks held, and the ingress's own /metrics sees it too (it read 0
before). Afterwards the request counts by final code, the latency histograms, token counts and
each stage's series match what was sent. The epd app also carries the Prometheus-server check
(tests/cluster/prometheus_check.py) and the log check: a request that fails in prefill is found
by its id in the ingress's, the encoder's and the prefill replica's log.
"""
import glob
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
from ray import serve

from tests.cluster.metrics_scrape import scrape, total, wait_for, worker_ids
from tests.cluster.prometheus_check import dashboard_queries_return_data
from tests.cluster.test_serving_modes import data_url, deploy

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
        assert sum(1 for _, line in zip(range(4), lines) if line.startswith(b"data:")) >= 3
        # it decodes now: the export shows it running on its engine, holding KV blocks
        wait_for(export, lambda s: (total(s, "ray_trisect_engine_running_sequences", role=decode_role) or 0) >= 1
                 and (total(s, "ray_trisect_kv_blocks_used", role=decode_role) or 0) > 0, timeout=20)
        own = requests.get(f"{base}/metrics", timeout=10).text          # the ingress's own /metrics
        running = [float(line.split()[-1]) for line in own.splitlines() if line.startswith("trisect_backend_running ")]
        used = [float(line.split()[-1]) for line in own.splitlines()
                if line.startswith("trisect_backend_kv_blocks_used ")]
        assert running and running[0] >= 1 and used and used[0] > 0, own
    # the client dropped the stream: nothing runs any more


def check_series(export: str, mode: str, before: set[str]) -> None:
    """After the six: counts by code, histograms, tokens and each stage's series."""
    def settled(s):
        codes = {c: total(s, "ray_trisect_requests_total", before, transport="http", code=c)
                 for c in ("OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED")}
        idle = total(s, "ray_trisect_engine_running_sequences", role=ROLES[mode][-1]) == 0
        return codes == {"OK": 3, "INVALID_ARGUMENT": 1, "DEADLINE_EXCEEDED": 1, "CANCELLED": 1} and idle and s
    s = wait_for(export, settled, timeout=30)
    fresh = lambda name, **labels: total(s, name, before, **labels)
    for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        unit = "seconds"
        assert fresh(f"ray_trisect_{h}_{unit}_count", transport="http") == 3, h
    assert fresh("ray_trisect_completion_tokens_total", transport="http") == 3 * MAX_TOKENS
    assert fresh("ray_trisect_ingress_in_flight_requests") == 0
    for role in ROLES[mode]:
        assert fresh("ray_trisect_instances", role=role) == 1, role
    for role in ROLES[mode][-2:] if mode != "aggregated" else ["aggregated"]:
        assert fresh("ray_trisect_kv_blocks_used", role=role) == 0, role
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


def find_in_logs(rid: str, app: str, deployments: list[str], timeout: float = 20) -> dict[str, list[str]]:
    logs = ray._private.worker._global_node.get_logs_dir_path()
    end = time.monotonic() + timeout
    while True:
        found = {}
        for d in deployments:
            lines = []
            for path in glob.glob(os.path.join(logs, "serve", f"replica_{app}_{d}_*.log")):
                with open(path, errors="replace") as f:
                    lines += [line for line in f if rid in line]
            found[d] = lines
        if all(found.values()) or time.monotonic() > end:
            return found
        time.sleep(0.5)


@pytest.mark.parametrize("mode", ["aggregated", "pd", "epd"])
def test_every_stage_exports_what_was_sent(serve_cluster, export, trisect_cache, make_image, request, mode):
    before = worker_ids(scrape(export))
    extra = {"redis_url": request.getfixturevalue("redis_url"), "rate_limit_per_s": 1000,
             "rate_limit_burst": 1000} if mode == "epd" else {}
    base = deploy(serve_cluster, mode, "tiny-llava", trisect_cache, name=f"metrics-{mode}", **extra)
    app = base.rsplit("/", 1)[1]
    prometheus = dashboard_queries_return_data(export) if mode == "epd" else None
    try:
        if prometheus:
            next(prometheus)                        # a Prometheus server scrapes from now on
        send_the_six(base, export, make_image(7), ROLES[mode][-1])
        check_series(export, mode, before)
        if mode != "epd":
            return
        # a request that fails in a stage (prefill: more KV than its engine has) is in every
        # stage's log that saw it, under the id the client sent, and the error names that id
        rid = f"trace-{uuid.uuid4().hex[:12]}"
        r = requests.post(f"{base}/v1/chat/completions", json=body("fail in prefill", [make_image(8)], 3500),
                          headers={"x-request-id": rid}, timeout=60)
        assert r.status_code == 400 and rid in r.json()["error"]["message"], r.text
        found = find_in_logs(rid, app, ["Ingress", "EncodeServer", "PrefillServer"])
        assert all(found.values()), json.dumps(found, indent=1)
        assert any("KV blocks" in line or "ERROR" in line for line in found["PrefillServer"]), found
        # ... and every dashboard query, evaluated by the Prometheus server, returns data
        next(prometheus)
    finally:
        if prometheus:
            prometheus.close()
        serve.delete(app)
