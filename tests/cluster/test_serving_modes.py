"""Aggregated, PD and EPD on a real local Ray Serve: token-exact with HF generate(), nothing leaks.

Requests go in through the ingress deployment's OpenAI-compatible HTTP endpoint (Serve's proxy),
so every test here exercises the whole path: ingress → orchestrator → stage deployments → KV
transfer through the object store → streamed tokens.
"""
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from ray import serve

from cluster.config import ClusterConfig
from cluster.redis_store import RedisStore
from cluster.registry import Registry
from services.app import build_app
from tests.reference import hf_greedy

pytestmark = pytest.mark.slow
PRESETS = {"tiny_llava": "tiny-llava", "tiny_qwen2_vl": "tiny-qwen2-vl"}


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(base: str, text: str, images: list, max_tokens: int) -> list[int]:
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    content.append({"type": "text", "text": text})
    body = {"model": "", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=40)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def deploy(serve_cluster, mode: str, preset: str, cache_dir, name: str | None = None, redis_url=None,
           rate_limit_per_s=None, rate_limit_burst=20, grpc_port=None, transfer="objectstore",
           embed_inline_limit_kib=1024, **stages) -> str:
    cfg = ClusterConfig(model=preset, mode=mode, cache_dir=str(cache_dir), grpc_port=grpc_port, redis_url=redis_url,
                        transfer=transfer, embed_inline_limit_kib=embed_inline_limit_kib,
                        kv_cache_memory_mib=32, rate_limit_per_s=rate_limit_per_s, rate_limit_burst=rate_limit_burst,
                        stages=stages)
    name = name or f"{mode}-{preset}" + ("-redis" if redis_url else "")
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    if redis_url:       # routing starts once every stage replica is in the registry
        wait_registered(redis_url, sum(cfg.stages[s].replicas for s in cfg.stage_names() if s != "ingress"))
    return f"{serve_cluster}/{name}"


def live_ids(url: str) -> set[str]:
    return {r.id for r in Registry(RedisStore(url)).live()}


def wait_registered(url: str, n: int, timeout: float = 30) -> set[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ids = live_ids(url)
        if len(ids) >= n:
            return ids
        time.sleep(0.2)
    raise AssertionError(f"only {live_ids(url)} registered, expected {n}")


def stage_stats(app: str, stage: str) -> list[dict]:
    handle = serve.get_deployment_handle(stage, app_name=app)
    # several calls so every replica answers at least once (Serve balances over them)
    stats = {s["instance_id"]: s for s in [handle.stats.remote().result(timeout_s=30) for _ in range(12)]}
    return list(stats.values())


@pytest.fixture(scope="module")
def redis_url():
    from cluster.redis_server import RedisServer
    with RedisServer() as server:
        yield server.url


@pytest.mark.parametrize("family", list(PRESETS))
@pytest.mark.parametrize("mode", ["aggregated", "pd", "epd"])
def test_modes_are_token_exact(serve_cluster, trisect_cache, request, make_image, mode, family):
    model = request.getfixturevalue(family)
    # aggregated and pd run without Redis (Serve balances alone); epd with the Redis router, which
    # is what splits one request's images over distinct encoders. Qwen2-VL's embeddings go E→P
    # through the object store (limit 0), tiny-llava's inline through the ingress: both paths exact
    stored = mode == "epd" and family == "tiny_qwen2_vl"
    extra = {"encode": {"replicas": 2}, "redis_url": request.getfixturevalue("redis_url"),
             "embed_inline_limit_kib": 0 if stored else 1024} if mode == "epd" else {}
    base = deploy(serve_cluster, mode, PRESETS[family], trisect_cache, **extra)
    app = base.rsplit("/", 1)[1]
    try:
        cases = [(f"request {i} about pictures", [make_image(100 + 10 * i + k) for k in range((0, 1, 3)[i % 3])])
                 for i in range(8)]
        with ThreadPoolExecutor(8) as pool:                       # 8 concurrent requests
            got = list(pool.map(lambda c: chat(base, c[0], c[1], 12), cases))
        for (text, images), tokens in zip(cases, got):
            assert tokens == hf_greedy(model, text, images, 12), (mode, text, len(images))
        if mode == "epd":
            encoders = stage_stats(app, "EncodeServer")
            assert len(encoders) == 2
            assert all(e["forwards"] > 0 for e in encoders), "3-image requests are split over both encoders"
            full = sum(p.numel() for p in model.model.parameters())
            vision = sum(p.numel() for n, p in model.model.named_parameters() if "language_model" not in n
                         and "lm_head" not in n)
            for e in encoders:
                assert e["parameters"] == vision < 0.2 * full, "encode replicas hold no LLM weights"
                assert e["resources"].get("encode_pool") == 1
                assert (e["stored_results"] > 0) == stored, e
        pools = {"AggregatedServer": "prefill_pool", "PrefillServer": "prefill_pool", "DecodeServer": "decode_pool",
                 "LLMPool": "llm_pool"}
        # epd runs with Redis, so role switching is on by default: prefill and decode are one pool
        for stage in {"aggregated": ["AggregatedServer"], "pd": ["PrefillServer", "DecodeServer"],
                      "epd": ["LLMPool"]}[mode]:
            for s in stage_stats(app, stage):
                assert s["resources"].get(pools[stage]) == 1, s
                assert s["free_blocks"] == s["total_blocks"] and s["handovers"] == 0 and s["senders"] == 0, s
    finally:
        serve.delete(app)


def test_pd_bad_input_deadline_and_disconnect(serve_cluster, trisect_cache, tiny_llava):
    """Bad input gets a precise 400; a deadline (504) and a client that drops a stream abort the
    request on prefill and decode; the cluster keeps serving throughout."""
    base = deploy(serve_cluster, "pd", "tiny-llava", trisect_cache, name="pd-cancel")
    app = base.rsplit("/", 1)[1]
    body = {"model": "", "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 400,
            "temperature": 0, "ignore_eos": True}
    try:
        bad_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
        bad = {**body, "messages": [{"role": "user", "content": [bad_image, {"type": "text", "text": "hi"}]}]}
        r = requests.post(f"{base}/v1/chat/completions", json=bad, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "images", r.text
        too_long = {**body, "max_tokens": 10**6}
        r = requests.post(f"{base}/v1/chat/completions", json=too_long, timeout=60)
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"], r.text
        r = requests.post(f"{base}/v1/chat/completions", json=body, headers={"x-trisect-timeout": "0.5"}, timeout=60)
        assert r.status_code == 504, r.text
        with requests.post(f"{base}/v1/chat/completions", json={**body, "stream": True}, stream=True,
                           timeout=60) as streamed:
            lines = streamed.iter_lines()
            assert sum(1 for _, line in zip(range(6), lines) if line.startswith(b"data:")) >= 3
        # the connection is closed mid-stream; every stage must let go of the request
        end = time.monotonic() + 15
        while True:
            held = [s for stage in ("PrefillServer", "DecodeServer") for s in stage_stats(app, stage)
                    if s["free_blocks"] != s["total_blocks"] or s["running"] or s["waiting"] or s["handovers"]]
            if not held or time.monotonic() > end:
                break
            time.sleep(0.3)
        assert not held, held
        assert chat(base, "still serving", [], 6) == hf_greedy(tiny_llava, "still serving", [], 6)
    finally:
        serve.delete(app)


def test_pd_over_shared_memory_transfer(serve_cluster, trisect_cache, tiny_qwen2_vl, make_image):
    base = deploy(serve_cluster, "pd", "tiny-qwen2-vl", trisect_cache, name="pd-shm", transfer="shm",
                  decode={"replicas": 2})
    app = base.rsplit("/", 1)[1]
    try:
        cases = [(f"shared memory {i}", [make_image(300 + i)] if i % 2 else []) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda c: chat(base, c[0], c[1], 10), cases))
        for (text, images), tokens in zip(cases, got):
            assert tokens == hf_greedy(tiny_qwen2_vl, text, images, 10)
        for stage in ("PrefillServer", "DecodeServer"):
            for s in stage_stats(app, stage):
                assert s["free_blocks"] == s["total_blocks"] and s["handovers"] == 0 and s["senders"] == 0, s
    finally:
        serve.delete(app)
