"""`--mode local` (no Ray): the ingress's /metrics carries the engine's series as well as the
request series, with values matching what was sent — the same six requests as the cluster modes'
test (tests/cluster/test_metrics_modes.py), through a real uvicorn server."""
import requests

from decoders.config import EngineConfig
from services.api_inputs import Limits
from services.api_metrics import ApiMetrics
from services.http_ingress import build_http_app
from services.local_backend import LocalBackend
from tests.cluster.metrics_scrape import read_events, scrape, total, wait_for
from tests.cluster.test_metrics_modes import LONG, MAX_TOKENS, body
from tests.integration.test_api_http import Server


def test_local_mode_exports_engine_and_request_series(tiny_llava, make_image):
    backend = LocalBackend(tiny_llava, EngineConfig(num_kv_blocks=256, max_model_len=2048), Limits(max_tokens=LONG))
    server = Server(build_http_app(backend, None, ApiMetrics(backend)))
    url, replica = f"{server.url}/metrics", backend.metrics.replica
    local = {"role": "local", "replica": replica}
    post = lambda b, **kw: requests.post(f"{server.url}/v1/chat/completions", json=b, timeout=60, **kw)
    try:
        prompt = "describe this picture in great detail please, every part of it " * 3
        for b in (body("hello there"), body(prompt, [make_image(7)]), body(prompt, [make_image(7)])):
            assert post(b).status_code == 200
        assert post(body("too long", max_tokens=10**6)).status_code == 400
        assert post(body("a story", max_tokens=LONG), headers={"x-trisect-timeout": "0.3"}).status_code == 504
        with requests.post(f"{server.url}/v1/chat/completions", json=body("a long story", max_tokens=LONG,
                           stream=True), stream=True, timeout=60) as streamed:
            lines = streamed.iter_lines()
            assert read_events(lines, 3) == 3                     # it streams: tokens decoded
            wait_for(url, lambda s: total(s, "trisect_engine_running_sequences", **local) == 1
                     and total(s, "trisect_kv_blocks_used", **local) > 0
                     and total(s, "trisect_backend_running") == 1, timeout=10)

        def settled(s):
            codes = {c: total(s, "trisect_requests_total", transport="http", code=c)
                     for c in ("OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED")}
            return (codes == {"OK": 3, "INVALID_ARGUMENT": 1, "DEADLINE_EXCEEDED": 1, "CANCELLED": 1}
                    and total(s, "trisect_kv_blocks_used", **local) == 0 and s)
        s = wait_for(url, settled, timeout=15)
        for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
            assert total(s, f"trisect_{h}_seconds_count", transport="http") == 3, h
        assert total(s, "trisect_completion_tokens_total", transport="http") == 3 * MAX_TOKENS
        assert total(s, "trisect_engine_running_sequences", **local) == 0
        assert total(s, "trisect_engine_waiting_sequences", **local) == 0
        assert total(s, "trisect_kv_blocks_free", **local) == backend.engine.block_manager.num_usable_blocks
        assert total(s, "trisect_engine_preemptions_total", **local) == 0
        assert total(s, "trisect_prefix_cache_hit_blocks_total", **local) >= 1       # the repeated prompt
        assert total(s, "trisect_prefix_cache_miss_blocks_total", **local) >= 1
        assert total(s, "trisect_encode_image_seconds_count", role="local") >= 2
        assert all(n.startswith(("trisect_", "python_", "process_")) for n, _, _ in scrape(url))
    finally:
        server.stop()
        backend.close()
