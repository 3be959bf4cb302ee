"""The cluster with its Redis control plane: cache-aware routing, Redis outages, rate limits.

Real redis-server, real local Ray Serve, requests over HTTP through the ingress."""
import io
import threading
import time

import pytest
import requests
from ray import serve

from cluster.redis_server import RedisServer
from services.client import TrisectClient
from tests.cluster.conftest import free_port
from tests.cluster.test_serving_modes import chat, deploy, stage_stats, wait_registered
from tests.reference import hf_greedy

pytestmark = pytest.mark.slow


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def redis():
    with RedisServer() as server:
        yield server


def test_epd_with_redis_routes_identical_images_to_the_cached_encoder_and_survives_an_outage(
        serve_cluster, trisect_cache, tiny_llava, make_image, redis):
    grpc_port = free_port()
    base = deploy(serve_cluster, "epd", "tiny-llava", trisect_cache, redis_url=redis.url, grpc_port=grpc_port,
                  encode={"replicas": 2}, prefill={"replicas": 1}, decode={"replicas": 2})
    app = base.rsplit("/", 1)[1]
    try:
        registered = wait_registered(redis.url, 5)                  # 2 encoders, 1 prefill, 2 decoders
        image = make_image(77)
        expected = hf_greedy(tiny_llava, "what is shown", [image], 10)
        assert chat(base, "what is shown", [image], 10) == expected
        time.sleep(0.3)                                              # the encoder's index entry lands
        forwards = sum(e["forwards"] for e in stage_stats(app, "EncodeServer"))
        for _ in range(4):                                           # the router sends it back there
            assert chat(base, "what is shown", [image], 10) == expected
        encoders = stage_stats(app, "EncodeServer")
        assert sum(e["forwards"] for e in encoders) == forwards, "an identical image must not be re-encoded"
        assert sum(e["cache_hits"] for e in encoders) >= 4
        # the same request over gRPC, served from inside the ingress replica
        with TrisectClient(f"127.0.0.1:{grpc_port}") as client:
            done = client.generate("what is shown", images=[png_bytes(image)], max_tokens=10, temperature=0.0,
                                   ignore_eos=True)
        assert list(done.token_ids) == expected and done.finish_reason == "length"

        # Redis dies and comes back (empty) while requests keep flowing: none may fail
        results, errors = [], []

        def client():
            for i in range(12):
                try:
                    text = f"outage request {i}"
                    results.append((text, chat(base, text, [], 8)))
                except Exception as e:                               # noqa: BLE001 - collected, asserted
                    errors.append(e)

        worker = threading.Thread(target=client)
        worker.start()
        time.sleep(1.0)
        redis.kill()
        time.sleep(2.0)
        redis.restart()
        restarted = time.monotonic()
        assert wait_registered(redis.url, 5, timeout=5) == registered, "replicas re-register within 5 s"
        assert time.monotonic() - restarted < 5
        worker.join(timeout=120)
        assert not errors, errors
        assert len(results) == 12
        for text, tokens in results:
            assert tokens == hf_greedy(tiny_llava, text, [], 8)
    finally:
        serve.delete(app)


def test_rate_limit_refuses_the_request_past_the_burst(serve_cluster, trisect_cache, redis):
    base = deploy(serve_cluster, "aggregated", "tiny-llava", trisect_cache, redis_url=redis.url,
                  rate_limit_per_s=0.01, rate_limit_burst=3, name="ratelimited")
    app = base.rsplit("/", 1)[1]
    try:
        body = {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        codes = [requests.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 429 and "retry after" in r.json()["error"]["message"]
    finally:
        serve.delete(app)
