"""Live role switching on a real local Ray Serve and a real redis-server: prefill and decode
replicas of one LLMPool deployment switch role in the middle of concurrent streamed requests;
every stream stays token-exact against HF generate() (so no token is missing or repeated), the
sequences on a switching decode instance move by KV export (none recomputed), and afterwards every
instance holds no KV block, sender or handover."""
import base64
import io
import json
import shutil
import tempfile
import threading
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
from cluster.roles import Role, RoleState
from services.app import build_app
from tests.cluster.conftest import free_port
from tests.reference import hf_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool_cluster():
    import ray
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    ray.init(num_cpus=2, resources={"llm_pool": 8}, _temp_dir=tmp, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", object_store_memory=256 * 2**20)
    try:
        with RedisServer() as redis:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield f"http://127.0.0.1:{port}", redis.url
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


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


def test_prefill_and_decode_switch_mid_stream_token_exact_with_kv_moves(pool_cluster, trisect_cache, tiny_llava,
                                                                          make_image):
    base, url = pool_cluster
    cfg = ClusterConfig(model="tiny-llava", mode="pd", cache_dir=str(trisect_cache), grpc_port=None, redis_url=url,
                        kv_cache_memory_mib=32, role_switching=True, role_controller=False,
                        stages={"prefill": {"replicas": 2}, "decode": {"replicas": 2}})
    serve.run(build_app(cfg), name="switch", route_prefix="/switch")
    base += "/switch"
    registry = Registry(RedisStore(url))
    try:
        recs = wait_for(lambda: (lambda rs: rs if len(rs) == 4 and all(r.routable for r in rs) else None)(
            pool_records(url)), 120, "4 ACTIVE pool instances")
        assert sorted(r.info.role.value for r in recs) == ["decode", "decode", "prefill", "prefill"], \
            "the first split follows the stages' replica counts"
        ids = [r.id for r in recs]
        cases = [(f"switch request {i} about pictures", [make_image(500 + 10 * i + k) for k in range(i % 4)])
                 for i in range(16)]
        expected = [hf_greedy(tiny_llava, t, imgs, 40) for t, imgs in cases]
        progress: dict = {}
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(stream_chat, base, t, imgs, 40, progress, k) for k, (t, imgs) in enumerate(cases)]
            # mid-stream: most clients hold a few tokens, one decode instance runs >= 8 sequences
            def busiest_decode():
                decs = [r for r in pool_records(url) if r.info.role is Role.DECODE]
                best = max(decs, key=lambda r: r.load.running)
                started = sum(1 for n in progress.values() if n >= 2)
                return best if best.load.running >= 8 and started >= 8 else None
            victim = wait_for(busiest_decode, 90, "a decode instance running >= 8 sequences")
            donor = next(r for r in pool_records(url) if r.info.role is Role.PREFILL)
            registry.request_role(victim.id, Role.PREFILL)           # what `trisect roles set` writes
            registry.request_role(donor.id, Role.DECODE)
            got = [f.result(timeout=180) for f in futures]
            mid = {k: n for k, n in progress.items()}
        for k, ((text, imgs), tokens) in enumerate(zip(cases, got)):
            assert tokens == expected[k], (k, text, len(imgs))
        after = wait_for(lambda: (lambda rs: rs if len(rs) == 4 and all(r.routable for r in rs) else None)(
            pool_records(url)), 60, "every instance ACTIVE again")
        roles = {r.id: r.info.role for r in after}
        assert roles[victim.id] is Role.PREFILL and roles[donor.id] is Role.DECODE
        assert sorted(r.value for r in roles.values()) == ["decode", "decode", "prefill", "prefill"]
        assert registry.desired_roles(ids) == {}, "a finished switch withdraws its request"

        def quiet():
            st = all_stats("switch", ids)
            held = [s for s in st.values() if s["free_blocks"] != s["total_blocks"] or s["senders"]
                    or s["handovers"] or s["running"] or s["waiting"]]
            return None if held else st
        stats = wait_for(quiet, 30, "all KV blocks free, no sender or handover left")
        v, d = stats[victim.id], stats[donor.id]
        assert [(s["from"], s["to"], s["outcome"]) for s in v["switches"]] == [("decode", "prefill", "switched")]
        assert [(s["from"], s["to"], s["outcome"]) for s in d["switches"]] == [("prefill", "decode", "switched")]
        assert v["moved_out"] >= 8, v
        assert sum(s.get("recomputed", 0) for s in stats.values()) == 0, "moved sequences are imported, not recomputed"
        assert sum(s.get("kv_imports", 0) for s in stats.values()) >= len(cases) + v["moved_out"]
        assert all(s["seconds"] > 0 for s in v["switches"] + d["switches"])
        # the pool still serves, through the switched instances too
        more = [(f"after the switch {i}", [make_image(900 + i)] if i % 2 else []) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda c: stream_chat(base, c[0], c[1], 12, {}, 0), more))
        for (text, imgs), tokens in zip(more, got):
            assert tokens == hf_greedy(tiny_llava, text, imgs, 12)
        print("switch seconds:", v["switches"][0]["seconds"], d["switches"][0]["seconds"], "moved:", v["moved_out"],
              "progress at switch:", sorted(mid.values()))
    finally:
        serve.delete("switch")
