"""Prometheus metrics of the API layer, shared by the gRPC and HTTP ingresses.

Life: `trisect serve` makes one ApiMetrics (own registry, so several servers in one process — tests
— never collide) and gives it to both ingresses. Each finished request is recorded once with its
transport and final code (OK, an error code, or CANCELLED when the client left); finished streams
add their TTFT/TPOT/end-to-end latency and token counts. Every record is mirrored into Ray's metrics
export (cluster/metrics.py) when the ingress runs in a Ray replica, and logged with the request's
id. Backend gauges (in flight, queued, running, KV blocks) are read from `backend.stats()` at
scrape time, so they are never stale. HTTP serves `render()` at /metrics: this registry plus the
process's stage series (all of them in `--mode local`).
"""

from __future__ import annotations

import logging
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from cluster import metrics as m
from services.api_types import GenerateDelta

log = logging.getLogger(__name__)

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
        self.e2e = Histogram(m.E2E.name, m.E2E.doc, ["transport"], buckets=m.E2E.buckets, registry=r)
        if backend is not None:
            r.register(_BackendCollector(backend))
        # (monotonic time, TTFT s, TPOT s or None) of recent requests: the role controller's SLO signal
        self.recent: deque[tuple[float, float, float | None]] = deque(maxlen=1024)

    def finished(self, transport: str, final: GenerateDelta) -> None:
        self._count(transport, "OK")
        usage, timings = final.usage, final.timings
        if usage is not None:
            for own, ray_series, n in ((self.prompt_tokens, m.PROMPT_TOKENS, usage.prompt_tokens),
                                       (self.completion_tokens, m.COMPLETION_TOKENS, usage.completion_tokens)):
                own.labels(transport).inc(n)
                ray_series.inc(n, transport=transport)
        if timings is not None:
            self._observe(self.ttft, m.TTFT, transport, timings.ttft_ms / 1e3)
            many = usage is not None and usage.completion_tokens > 1
            self.recent.append((time.monotonic(), timings.ttft_ms / 1e3, timings.tpot_ms / 1e3 if many else None))
            if usage is not None:
                gaps = max(usage.completion_tokens - 1, 0)
                self._observe(self.e2e, m.E2E, transport, (timings.ttft_ms + timings.tpot_ms * gaps) / 1e3)
                if gaps:
                    self._observe(self.tpot, m.TPOT, transport, timings.tpot_ms / 1e3)

    def recent_latency(self, window_s: float = 10.0) -> tuple[float | None, float | None]:
        """p90 TTFT and p90 TPOT (s) of the requests finished in the last `window_s` (None: none)."""
        since = time.monotonic() - window_s
        ttft = sorted(t for at, t, _ in list(self.recent) if at >= since)
        tpot = sorted(t for at, _, t in list(self.recent) if at >= since and t is not None)
        p90 = lambda xs: xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else None
        return p90(ttft), p90(tpot)

    def failed(self, transport: str, code: str) -> None:
        self._count(transport, code)

    def _count(self, transport: str, code: str) -> None:
        self.requests.labels(transport, code).inc()
        m.REQUESTS.inc(transport=transport, code=code)
        log.log(logging.DEBUG if code == "OK" else logging.INFO, "request ended %s (%s)", code, transport)

    @staticmethod
    def _observe(own, ray_series, transport: str, seconds: float) -> None:
        own.labels(transport).observe(seconds)
        ray_series.observe(seconds, transport=transport)

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(m.REGISTRY)
