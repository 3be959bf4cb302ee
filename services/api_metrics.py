"""Prometheus metrics of the API layer, shared by the gRPC and HTTP ingresses.

Life: `trisect serve` makes one ApiMetrics (own registry, so several servers in one process — tests
— never collide) and gives it to both ingresses. Each finished request is recorded once with its
transport and outcome code; finished streams add their TTFT/TPOT and token counts. Backend gauges
(in flight, queued, running, KV blocks) are read from `backend.stats()` at scrape time, so they are
never stale. HTTP serves `render()` at /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from services.api_types import GenerateDelta

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class _BackendCollector:
    def __init__(self, backend):
        self._backend = backend

    def collect(self):
        stats = self._backend.stats().as_dict()
        for name, value in stats.items():
            g = GaugeMetricFamily(f"trisect_backend_{name}", f"backend stats(): {name}")
            g.add_metric([], value)
            yield g


class ApiMetrics:
    def __init__(self, backend=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("trisect_requests", "finished API requests by outcome",
                                ["transport", "code"], registry=r)
        self.ttft = Histogram("trisect_time_to_first_token_seconds", "arrival to first token",
                              ["transport"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("trisect_time_per_output_token_seconds",
                              "mean gap between output tokens", ["transport"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("trisect_prompt_tokens", "prompt tokens of finished requests",
                                     ["transport"], registry=r)
        self.completion_tokens = Counter("trisect_completion_tokens", "generated tokens",
                                         ["transport"], registry=r)
        if backend is not None:
            r.register(_BackendCollector(backend))

    def finished(self, transport: str, final: GenerateDelta) -> None:
        self.requests.labels(transport, "OK").inc()
        if final.usage is not None:
            self.prompt_tokens.labels(transport).inc(final.usage.prompt_tokens)
            self.completion_tokens.labels(transport).inc(final.usage.completion_tokens)
        if final.timings is not None:
            self.ttft.labels(transport).observe(final.timings.ttft_ms / 1e3)
            if final.usage is not None and final.usage.completion_tokens > 1:
                self.tpot.labels(transport).observe(final.timings.tpot_ms / 1e3)

    def failed(self, transport: str, code: str) -> None:
        self.requests.labels(transport, code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
