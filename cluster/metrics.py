"""Every Prometheus series trisect exports, in one catalogue, recorded wherever it happens.

Life of a value: a stage (ingress, encoder, prefill/decode engine, Redis store) calls
`SERIES.inc/set/observe(value, **labels)`. Inside a Ray worker (any Serve replica) the value goes to
Ray's metrics export — `ray.util.metrics`, which the node's metrics agent serves on its
metrics-export port (what KubeRay's PodMonitor scrapes), with Ray's `ray_` name prefix and its own
`WorkerId`/`NodeAddress`/`SessionName` labels added. Series marked `local` also go to the process
registry `REGISTRY` (prometheus_client), which the ingress renders at `/metrics` — that is how
`--mode local`, with no Ray at all, exports the same stage series under the same names minus the
prefix. Ray objects are made lazily on first use in a worker, so importing this costs nothing.

Conventions (docs/metrics.md lists every series): base units in names (`_seconds`, `_bytes`,
`_blocks`), counters end in `_total`, and labels are bounded: role, replica (a Serve replica id,
one per process), transport, code, backend — never a request id.
"""
from __future__ import annotations

import sys
import threading

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as _PCounter
from prometheus_client import Gauge as _PGauge
from prometheus_client import Histogram as _PHistogram

REGISTRY = CollectorRegistry(auto_describe=True)
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
FAST_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")                # never import Ray just to find it is not there
    return ray is not None and ray.is_initialized()


class Series:
    """One metric: a prometheus_client object (when `local`) and, in a Ray worker, a Ray one."""

    __slots__ = ("kind", "name", "doc", "labels", "buckets", "local", "_prom", "_ray", "_lock")

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...] = (), buckets=None,
                 local: bool = True):
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric kind {kind!r}")
        if (kind == "counter") != name.endswith("_total"):
            raise ValueError(f"{name}: counters, and only counters, end in _total")
        if "request_id" in labels:
            raise ValueError("a request id is unbounded: never a label")
        self.kind, self.name, self.doc, self.labels = kind, name, doc, tuple(labels)
        self.buckets, self.local = tuple(buckets or LATENCY_BUCKETS), local
        self._ray, self._lock = None, threading.Lock()
        self._prom = None
        if local:
            cls = {"counter": _PCounter, "gauge": _PGauge, "histogram": _PHistogram}[kind]
            extra = {"buckets": self.buckets} if kind == "histogram" else {}
            self._prom = cls(name, doc, self.labels, registry=REGISTRY, **extra)

    def _ray_metric(self):
        if self._ray is None and _ray_running():
            with self._lock:
                if self._ray is None:
                    from ray.util import metrics as rm
                    if self.kind == "counter":
                        self._ray = rm.Counter(self.name, self.doc, tag_keys=self.labels)
                    elif self.kind == "gauge":
                        self._ray = rm.Gauge(self.name, self.doc, tag_keys=self.labels)
                    else:
                        self._ray = rm.Histogram(self.name, self.doc, boundaries=list(self.buckets),
                                                 tag_keys=self.labels)
        return self._ray

    def _record(self, method: str, value: float, labels: dict) -> None:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {sorted(labels)}")
        tags = {k: str(v) for k, v in labels.items()}
        if self._prom is not None:
            m = self._prom.labels(**tags) if self.labels else self._prom
            getattr(m, method)(value)
        ray_metric = self._ray_metric()
        if ray_metric is None:
            return
        if method == "inc" and value == 0:
            # Ray's Counter.inc refuses 0, but a series should exist from its start at 0 (a rate
            # over a series that appears only with its first event misses that event)
            ray_metric._record(0.0, tags=tags or None)
        else:
            getattr(ray_metric, method)(value, tags=tags or None)

    def inc(self, value: float = 1.0, **labels) -> None:
        """`inc(0, ...)` makes the series exist at 0 (called once per label set at start-up)."""
        if value < 0:
            raise ValueError(f"{self.name}: counters only go up")
        self._record("inc", value, labels)

    def set(self, value: float, **labels) -> None:
        self._record("set", value, labels)

    def observe(self, value: float, **labels) -> None:
        self._record("observe", value, labels)


def _series(*args, **kwargs) -> Series:
    s = Series(*args, **kwargs)
    CATALOGUE.append(s)
    return s


CATALOGUE: list[Series] = []
STAGE = ("role", "replica")

# ---- requests, at the ingress (its /metrics has these from services/api_metrics.py: Ray-only here)
REQUESTS = _series("counter", "trisect_requests_total", "finished API requests by final status code "
                   "(OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, "
                   "INTERNAL, ...)", ("transport", "code"), local=False)
TTFT = _series("histogram", "trisect_time_to_first_token_seconds", "arrival to first token",
               ("transport",), local=False)
TPOT = _series("histogram", "trisect_time_per_output_token_seconds", "mean gap between output tokens",
               ("transport",), local=False)
E2E = _series("histogram", "trisect_e2e_request_latency_seconds", "arrival to last token of finished requests",
              ("transport",), buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), local=False)
PROMPT_TOKENS = _series("counter", "trisect_prompt_tokens_total", "prompt tokens of finished requests",
                        ("transport",), local=False)
COMPLETION_TOKENS = _series("counter", "trisect_completion_tokens_total", "generated tokens of finished "
                            "requests", ("transport",), local=False)
IN_FLIGHT = _series("gauge", "trisect_ingress_in_flight_requests", "requests admitted by an ingress and "
                    "not finished", ("replica",))
RATE_LIMITED = _series("counter", "trisect_rate_limited_requests_total", "requests refused by the per-key "
                       "rate limit")

# ---- instances, queues and KV, per stage replica (sampled by services/stage_metrics.py)
INSTANCES = _series("gauge", "trisect_instances", "1 per live instance; sum by role = instances per role",
                    STAGE)
WAITING = _series("gauge", "trisect_engine_waiting_sequences", "sequences queued in an engine", STAGE)
RUNNING = _series("gauge", "trisect_engine_running_sequences", "sequences being prefilled or decoded",
                  STAGE)
KV_USED = _series("gauge", "trisect_kv_blocks_used", "KV blocks held by sequences", STAGE)
KV_FREE = _series("gauge", "trisect_kv_blocks_free", "KV blocks free (prefix-cache-only blocks count "
                  "as free: they are reclaimable)", STAGE)
PREEMPTIONS = _series("counter", "trisect_engine_preemptions_total", "sequences preempted (recompute) "
                      "for lack of KV blocks", STAGE)
PREFIX_HITS = _series("counter", "trisect_prefix_cache_hit_blocks_total", "prompt blocks served from the "
                      "prefix cache", STAGE)
PREFIX_MISSES = _series("counter", "trisect_prefix_cache_miss_blocks_total", "full prompt blocks looked up "
                        "in the prefix cache and not found", STAGE)

# ---- role switching (services/switchable.py: replicas of the shared LLM pool)
ROLE_SWITCH_OUTCOMES = ("switched", "cancelled", "failed")
ROLE_SWITCHES = _series("counter", "trisect_role_switches_total", "live role switches of LLM-pool replicas by "
                        "outcome (switched, cancelled, failed)", ("outcome",), local=False)
ROLE_SWITCH_SECONDS = _series("histogram", "trisect_role_switch_seconds", "duration of a live role switch "
                              "(drain + flip)", ("outcome",), buckets=(.1, .25, .5, 1, 2, 5, 10, 30, 60), local=False)

# ---- encoders
ENCODE_QUEUE = _series("gauge", "trisect_encode_queue_images", "images waiting for or in an encoder "
                       "forward", STAGE)
MM_HITS = _series("counter", "trisect_mm_cache_hits_total", "images whose embedding came from an "
                  "encoder's content-hash cache", STAGE)
MM_MISSES = _series("counter", "trisect_mm_cache_misses_total", "images an encoder had to run", STAGE)
ENCODE_SECONDS = _series("histogram", "trisect_encode_image_seconds", "encode call latency divided by "
                         "its images (cache hits included), one observation per image", ("role",))

# ---- KV transfer prefill → decode, observed on the receiving (decode) side
TRANSFER_BYTES = _series("counter", "trisect_kv_transfer_bytes_total", "KV bytes received", ("backend",))
TRANSFER_SECONDS = _series("histogram", "trisect_kv_transfer_seconds", "ticket in hand to payload "
                           "received", ("backend",), buckets=FAST_BUCKETS)
TRANSFER_FAILURES = _series("counter", "trisect_kv_transfer_failures_total", "KV transfers that ended "
                            "FAILED (the orchestrator re-prefills)", ("backend",))

# ---- Redis (cluster/redis_store.py)
REDIS_SECONDS = _series("histogram", "trisect_redis_round_trip_seconds", "one Redis command, script or "
                        "pipeline, issued to answer", buckets=FAST_BUCKETS)
REDIS_OUTAGES = _series("counter", "trisect_redis_outages_total", "times Redis became unreachable (the "
                        "circuit opened after it had been reachable)")
