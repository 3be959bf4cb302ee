"""Live role switching on a real local Ray Serve and a real redis-server: prefill and decode
replicas of one LLMPool deployment switch role in the middle of concurrent streamed requests;
every stream stays token-exact against HF generate() (so no token is missing or repeated), the
sequences on a switching decode instance move by KV export (none recomputed), and afterwards every
instance holds no KV block, sender or handover."""
import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from ray import serve

from cluster.config import ClusterConfig
from cluster.redis_server import RedisServer
from cluster.redis_store import RedisStore
from cluster.registry import Registry
from cluster.request_router import pinned
from cluster.roles import Role
from services.app import build_app
from tests.reference import hf_greedy

pytestmark = pytest.mark.slow
PRESETS = {"tiny_llava": "tiny-llava", "tiny_qwen2_vl": "tiny-qwen2-vl"}


@pytest.fixture(scope="module")
def pool_cluster(serve_cluster):
    """The cluster tests' local Ray + Serve (it offers llm_pool)."""
    return serve_cluster


@pytest.fixture
def redis_url():
    """A Redis per test: the previous app's records (TTL 3 s) must not count in the next one's split."""
    with RedisServer() as redis:
        yield redis.url


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stream_chat(base, text, images, max_tokens, progress, key) -> list[int]:
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    content.append({"type": "text", "text": text})
    body = {"model": "", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, "stream": True}
    tokens = []
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            msg = json.loads(line[6:])
            assert "error" not in msg, msg
            for c in msg["choices"]:
                tokens += c.get("token_ids", [])
            progress[key] = len(tokens)
    return tokens


def pool_records(url):
    return [r for r in Registry(RedisStore(url)).live() if r.info.pool == "llm_pool"]


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def all_stats(app, ids):
    handle = serve.get_deployment_handle("LLMPool", app_name=app)
    return {i: pinned(handle, i).stats.remote().result(timeout_s=30) for i in ids}


def all_active(url):
    recs = pool_records(url)
    return recs if len(recs) == 4 and all(r.routable for r in recs) else None


N_REQUESTS, MAX_TOKENS = 24, 64


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen2_vl"])
def test_prefill_and_decode_switch_mid_stream_token_exact_with_kv_moves(pool_cluster, redis_url, trisect_cache, request,
                                                                          family, make_image):
    model = request.getfixturevalue(family)
    url, app = redis_url, f"switch-{family}"
    cfg = ClusterConfig(model=PRESETS[family], mode="pd", cache_dir=str(trisect_cache), grpc_port=None, redis_url=url,
                        kv_cache_memory_mib=64, role_switching=True, role_controller=False,
                        stages={"prefill": {"replicas": 2}, "decode": {"replicas": 2}})
    # expected tokens first: the reference must not compete with the cluster for the 2 cores
    cases = [(f"switch request {i} about pictures", [make_image(500 + 10 * i + k) for k in range(i % 4)])
             for i in range(N_REQUESTS)]
    t0 = time.monotonic()
    expected = [hf_greedy(model, t, imgs, MAX_TOKENS) for t, imgs in cases]
    took = {"reference": time.monotonic() - t0}
    serve.run(build_app(cfg), name=app, route_prefix=f"/{app}")
    base = f"{pool_cluster}/{app}"
    registry = Registry(RedisStore(url))
    try:
        recs = wait_for(lambda: all_active(url), 180, "4 ACTIVE pool instances")
        took["start"] = time.monotonic() - t0 - took["reference"]
        assert sorted(r.info.role.value for r in recs) == ["decode", "decode", "prefill", "prefill"], \
            "the first split follows the stages' replica counts"
        ids = [r.id for r in recs]
        progress: dict = {}
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(stream_chat, base, t, imgs, MAX_TOKENS, progress, k)
                       for k, (t, imgs) in enumerate(cases)]

            # mid-stream: a decode instance runs >= 8 sequences (its own count, not the registry's
            # last heartbeat) and at least 8 clients hold part of their answer, some of it decoded
            def busiest_decode():
                decs = [r.id for r in pool_records(url) if r.info.role is Role.DECODE]
                running = {i: s["running"] for i, s in all_stats(app, decs).items()}
                best = max(running, key=running.get)
                streaming = sum(1 for n in progress.values() if 2 <= n < MAX_TOKENS)
                return best if running[best] >= 8 and streaming >= 8 else None
            victim = wait_for(busiest_decode, 180, "a decode instance running >= 8 sequences")
            donor = next(r.id for r in pool_records(url) if r.info.role is Role.PREFILL)
            registry.request_role(victim, Role.PREFILL)               # what `trisect roles set` writes
            registry.request_role(donor, Role.DECODE)
            at_switch = dict(progress)
            got = [f.result(timeout=300) for f in futures]
        for k, ((text, imgs), tokens) in enumerate(zip(cases, got)):
            assert tokens == expected[k], (k, text, len(imgs))     # none missing, repeated or changed
        streaming = [n for n in at_switch.values() if 2 <= n < MAX_TOKENS]
        assert len(streaming) >= 8, at_switch
        took["stream"] = time.monotonic() - t0 - took["reference"] - took["start"]

        after = wait_for(lambda: all_active(url), 60, "every instance ACTIVE again")
        roles = {r.id: r.info.role for r in after}
        assert roles[victim] is Role.PREFILL and roles[donor] is Role.DECODE
        assert sorted(r.value for r in roles.values()) == ["decode", "decode", "prefill", "prefill"]
        assert registry.desired_roles(ids) == {}, "a finished switch withdraws its request"

        def quiet():
            st = all_stats(app, ids)
            held = [s for s in st.values() if s["free_blocks"] != s["total_blocks"] or s["senders"]
                    or s["handovers"] or s["running"] or s["waiting"]]
            return None if held else st
        stats = wait_for(quiet, 60, "all KV blocks free, no sender or handover left")
        v, d = stats[victim], stats[donor]
        assert [(s["from"], s["to"], s["outcome"]) for s in v["switches"]] == [("decode", "prefill", "switched")]
        assert [(s["from"], s["to"], s["outcome"]) for s in d["switches"]] == [("prefill", "decode", "switched")]
        assert all(s["seconds"] > 0 for s in v["switches"] + d["switches"])
        assert v["moved_out"] >= 8, v
        total = lambda key: sum(s.get(key, 0) for s in stats.values())
        # nothing recomputed: one prefill per request (no re-prefill, no retry after a failed move)
        # and every handover — from prefill or moved out of the switching decode — imported as KV
        assert total("prefills") == len(cases), {i: s.get("prefills") for i, s in stats.items()}
        assert total("recomputed") == 0
        assert total("kv_imports") == len(cases) + total("moved_out")

        # the pool still serves, through the switched instances too
        more = [(f"after the switch {i}", [make_image(900 + i)] if i % 2 else []) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda c: stream_chat(base, c[0], c[1], 12, {}, 0), more))
        for (text, imgs), tokens in zip(more, got):
            assert tokens == hf_greedy(model, text, imgs, 12)
        print(f"{family}: switch seconds decode->prefill {v['switches'][0]['seconds']:.2f}, prefill->decode "
              f"{d['switches'][0]['seconds']:.2f}; moved {v['moved_out']}; tokens per stream at the switch "
              f"{sorted(at_switch.values())}; seconds: " + ", ".join(f"{k} {x:.0f}" for k, x in took.items())
              + f", checks {time.monotonic() - t0 - sum(took.values()):.0f}")
    finally:
        serve.delete(app)


def sized_app(cfg, llm_replicas: int):
    """build_app(cfg) with the pool at `llm_replicas` and one fixed code version: redeploying it
    then changes the replica count and nothing else, as Serve's autoscaler does (by default each
    serve.run is a new version, and Serve would replace every replica: a rolling restart)."""
    app = build_app(cfg)
    ingress = app._bound_deployment
    pool = ingress.init_kwargs["prefill"]._bound_deployment
    ingress._version = pool._version = "v1"
    pool._deployment_config.num_replicas = llm_replicas
    return app


def test_scale_down_under_load_drains_first_and_loses_no_request(pool_cluster, redis_url, trisect_cache, tiny_llava,
                                                                 make_image):
    """Serve removes one of 4 pool replicas (what its autoscaler does: same code and arguments,
    a lower replica count) in the middle of 16 streamed requests: the removed replica leaves
    routing first (DRAINING in the registry, running decodes moved out), every stream ends
    token-exact, the registry ends with the 3 others ACTIVE and every KV block free."""
    url, app, n_tokens = redis_url, "scale-down", 48
    cfg = ClusterConfig(model="tiny-llava", mode="pd", cache_dir=str(trisect_cache), grpc_port=None, redis_url=url,
                        kv_cache_memory_mib=64, role_switching=True, role_controller=False,
                        stages={"prefill": {"replicas": 2}, "decode": {"replicas": 2}})
    cases = [(f"scale down request {i}", [make_image(700 + 10 * i + k) for k in range(i % 3)]) for i in range(16)]
    expected = [hf_greedy(tiny_llava, t, imgs, n_tokens) for t, imgs in cases]
    serve.run(sized_app(cfg, 4), name=app, route_prefix=f"/{app}")
    base = f"{pool_cluster}/{app}"
    try:
        before = {r.id for r in wait_for(lambda: all_active(url), 180, "4 ACTIVE pool instances")}
        progress: dict = {}
        seen: dict[str, set] = {}                 # instance -> states seen while scaling down
        with ThreadPoolExecutor(len(cases) + 1) as pool:
            futures = [pool.submit(stream_chat, base, t, imgs, n_tokens, progress, k)
                       for k, (t, imgs) in enumerate(cases)]
            wait_for(lambda: sum(1 for n in progress.values() if 2 <= n < n_tokens) >= 8, 180, "8 streams decoding")
            shrink = pool.submit(serve.run, sized_app(cfg, 3), name=app, route_prefix=f"/{app}")
            at_shrink = dict(progress)

            def shrunk():
                recs = pool_records(url)
                for r in recs:
                    seen.setdefault(r.id, set()).add(r.state.value)
                return len(recs) == 3 and all(r.routable for r in recs)
            wait_for(shrunk, 180, "the pool down to 3 ACTIVE instances")
            shrink.result(timeout=180)
            got = [f.result(timeout=300) for f in futures]
        for k, ((text, imgs), tokens) in enumerate(zip(cases, got)):
            assert tokens == expected[k], (k, text, len(imgs))
        after = {r.id for r in pool_records(url)}
        assert len(before - after) == 1 and after < before, (before, after, seen)
        (removed,) = before - after
        assert "draining" in seen[removed], ("the removed replica left routing before it went", seen)
        def quiet():
            st = all_stats(app, sorted(after))
            return all(s["free_blocks"] == s["total_blocks"] and not s["senders"] and not s["handovers"]
                       for s in st.values()) and st
        stats = wait_for(quiet, 60, "all KV blocks free")
        assert sum(s.get("recomputed", 0) for s in stats.values()) == 0
        print(f"scale-down: removed {removed} (states seen {sorted(seen[removed])}); KV imports on the others "
              f"{sum(s.get('kv_imports', 0) for s in stats.values())}; tokens per stream when it began "
              f"{sorted(at_shrink.values())}")
    finally:
        serve.delete(app)
