"""The fault-injection harness: one small EPD cluster on a real local Ray Serve and a real
redis-server, and the tools to hurt it through Ray's API (tests/faults/test_faults.py).

Life: `fault_cluster` (one per test module: starting Ray and loading the replicas costs more than
the tests) starts redis-server, a local Ray with the three pools and Serve, deploys tiny-llava in EPD mode with
1 encoder, 1 prefill and 2 decode replicas — the smallest layout where a dead decode instance has a
live peer to migrate to — and waits until all four are in the Redis registry. Role switching is
off, so a replica's stage is its deployment. A test that kills replicas waits (`wait_replaced`)
until Serve has replaced them and the replacements are routable before it hands the cluster on.

Finding and killing a replica: Serve names each replica's actor `SERVE_REPLICA::<app>#<deployment>#
<id>` in the "serve" namespace, and <id> is the replica id the instance registers in Redis and the
router pins to. `ray.util.list_named_actors(all_namespaces=True)` lists those names (it needs no
dashboard, unlike `ray.util.state.list_actors`), `ray.get_actor(name, namespace="serve")` gives the
actor handle and `ray.kill(handle)` kills it as a crash would: calls in flight on it fail with
ActorDiedError, and Serve's controller starts a replacement at its next health check.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import requests

from tests.cluster.conftest import free_port

APP = "faults"
KV_CACHE_MIB = 32            # 169 blocks of 16 tokens: less than the 4096-token context (test_stage_errors)
LAYOUT = {"EncodeServer": 1, "PrefillServer": 1, "DecodeServer": 2}


@dataclass
class Faults:
    base: str                # HTTP root of the app
    grpc_target: str
    redis_url: str


@contextlib.contextmanager
def fault_cluster(trisect_cache):
    import ray
    from ray import serve

    from cluster.config import ClusterConfig
    from cluster.redis_server import RedisServer
    from services.app import build_app
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")     # short: Ray's socket paths are length-limited
    port, grpc_port = free_port(), free_port()
    with RedisServer() as redis:
        try:
            ray.init(num_cpus=2, resources={"encode_pool": 8, "prefill_pool": 8, "decode_pool": 8}, _temp_dir=tmp,
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     object_store_memory=256 * 2**20)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            cfg = ClusterConfig(model="tiny-llava", mode="epd", cache_dir=str(trisect_cache), redis_url=redis.url,
                                role_switching=False, grpc_port=grpc_port, kv_cache_memory_mib=KV_CACHE_MIB,
                                prefault_object_store=False,
                                stages={"encode": {"replicas": 1}, "prefill": {"replicas": 1},
                                        "decode": {"replicas": 2}})
            serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}")
            wait_replaced(redis.url, set(), timeout=120)
            yield Faults(f"http://127.0.0.1:{port}/{APP}", f"127.0.0.1:{grpc_port}", redis.url)
        finally:
            if ray.is_initialized():
                serve.shutdown()
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


# ---- replicas: find, ask, kill, wait for their replacement ----------------------------------------
def replicas(deployment: str) -> dict[str, str]:
    """Replica id -> actor name of the deployment's live replica actors."""
    import ray
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return {n[len(prefix):]: n for n in names if n.startswith(prefix)}


def stats(deployment: str, replica_id: str) -> dict:
    """The replica's own stats, asked of that replica (pinned as the router pins a request). A pin
    Serve's handle does not know yet falls back to another replica: ask again until it is known."""
    from ray import serve

    from cluster.request_router import pinned
    handle = pinned(serve.get_deployment_handle(deployment, app_name=APP), replica_id)
    for _ in range(50):
        s = handle.stats.remote().result(timeout_s=30)
        if s["instance_id"] == replica_id:
            return s
        time.sleep(0.2)
    raise AssertionError(f"{deployment} replica {replica_id} never answered its pinned calls")


def kill(deployment: str, replica_id: str) -> None:
    import ray
    ray.kill(ray.get_actor(replicas(deployment)[replica_id], namespace="serve"))


def live_ids(redis_url: str) -> set[str]:
    from cluster.redis_store import RedisStore
    from cluster.registry import Registry
    return {r.id for r in Registry(RedisStore(redis_url)).live()}


def wait_replaced(redis_url: str, killed: set[str], timeout: float = 90) -> dict[str, set[str]]:
    """Until every deployment has its replica count again, none of them a killed one, all of them
    in the registry and the killed ones out of it (their records expired). Deployment -> ids."""
    from ray import serve
    end = time.monotonic() + timeout
    while True:
        now = {d: set(replicas(d)) for d in LAYOUT}
        live = live_ids(redis_url)
        ids = set().union(*now.values())
        app = serve.status().applications.get(APP)
        running = {d: app.deployments[d].replica_states.get("RUNNING", 0) for d in LAYOUT} if app else {}
        if (running == LAYOUT and all(len(now[d]) == n for d, n in LAYOUT.items()) and not ids & killed
                and ids <= live and not live & killed):
            return now
        assert time.monotonic() < end, f"not replaced within {timeout}s: {now}, registry {live}, killed {killed}"
        time.sleep(0.5)


def wait_idle(timeout: float = 30) -> None:
    """Every prefill/decode replica holds no block, sequence, handover or sender."""
    end = time.monotonic() + timeout
    while True:
        held = [s for d in ("PrefillServer", "DecodeServer") for s in (stats(d, r) for r in replicas(d))
                if s["free_blocks"] != s["total_blocks"] or s["running"] or s["waiting"] or s["handovers"]
                or s["senders"]]
        if not held:
            return
        assert time.monotonic() < end, held
        time.sleep(0.3)


# ---- a client that streams and records what happened ----------------------------------------------
@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    status: int | None = None        # HTTP status of the response
    error: dict | None = None        # the OpenAI-style error body (before or during the stream)
    finish: str | None = None
    seconds: float = 0.0
    done: bool = False               # the stream ended ([DONE], an error event or an error status)


def stream_chat(base: str, text: str, max_tokens: int, out: Outcome, images: list = (),
                deadline_s: float | None = None, read_timeout_s: float = 120) -> Outcome:
    """One streamed request through the ingress's HTTP API; tokens land in `out` as they arrive."""
    from tests.cluster.test_serving_modes import data_url
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    content.append({"type": "text", "text": text})
    body = {"model": "", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, "stream": True}
    headers = {"x-trisect-timeout": str(deadline_s)} if deadline_s else {}
    start = time.monotonic()
    with requests.post(f"{base}/v1/chat/completions", json=body, headers=headers, stream=True,
                       timeout=(10, read_timeout_s)) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.error = r.json().get("error")
        else:
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]
                    continue
                for choice in event["choices"]:
                    out.tokens += choice.get("token_ids", [])
                    out.finish = choice.get("finish_reason") or out.finish
    out.seconds, out.done = time.monotonic() - start, True
    return out
