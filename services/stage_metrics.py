"""A stage replica's metrics: gauges sampled from its own state, counters fed by what it did.

Life: a replica's constructor calls `watch_engine(engine, role, replica)` (prefill, decode,
aggregated, local) or `watch_encoder(server)`, which starts one daemon thread sampling every
`interval_s`: it sets the queue, running and KV gauges and adds to the preemption and cache
counters the difference since the last sample (the engine and encoder keep plain cumulative ints,
so they stay free of any metrics code). It reads without the engine lock, as the Redis presence
thread does: a figure a step stale is fine for a gauge. Events that happen per call — an encode, a
KV transfer — are recorded where they happen with `encoded(...)` and `transferred(...)`.
Everything lands in cluster/metrics.py's catalogue: Ray's metrics export in a replica, the
process registry (the ingress's /metrics) in `--mode local`.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable

from cluster import metrics as m

log = logging.getLogger(__name__)
INTERVAL_S = 0.5


class Sampler:
    """Calls `sample()` every `interval_s` on a daemon thread until `close()`; `replica` is the
    label value of what it samples."""

    def __init__(self, sample: Callable[[], None], replica: str, interval_s: float = INTERVAL_S):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.sample, self.replica, self.interval_s = sample, replica, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"metrics-{replica}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:                      # metrics must never take a replica down
                log.exception("metrics sample failed")
            if self._stop.wait(self.interval_s):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Deltas:
    """Turns cumulative counts into counter increments (a new label set — a replica's new role —
    starts at 0 and goes on from the source's current total: nothing is counted twice)."""

    __slots__ = ("last", "seen")

    def __init__(self):
        self.last: dict[str, int] = {}
        self.seen: set[tuple] = set()

    def add(self, series: m.Series, key: str, total: int, **labels) -> None:
        prev = self.last.get(key, 0)
        if total < prev:                           # the source was reset (a new engine): count afresh
            prev = 0
        first = (key, *sorted(labels.items())) not in self.seen
        if total > prev or first:                  # the first sample makes the series exist at 0
            series.inc(total - prev, **labels)
            self.seen.add((key, *sorted(labels.items())))
        self.last[key] = total


def watch_engine(engine, role, replica: str, interval_s: float = INTERVAL_S) -> Sampler:
    """role: the label, or a callable giving it — a role-switching replica's changes; on a change
    the old role's gauges of this replica drop to 0 (instances per role stays true) and the
    counters go on under the new one."""
    deltas, now = _Deltas(), {}
    role_of = role if callable(role) else (lambda: role)

    def sample():
        bm, sched = engine.block_manager, engine.scheduler
        labels = {"role": role_of(), "replica": replica}
        old = now.get("labels")
        if old is not None and old != labels:
            for gauge in (m.INSTANCES, m.WAITING, m.RUNNING, m.KV_FREE, m.KV_USED):
                gauge.set(0, **old)
        now["labels"] = labels
        m.INSTANCES.set(1, **labels)
        m.WAITING.set(len(sched.waiting), **labels)
        m.RUNNING.set(len(sched.running), **labels)
        m.KV_FREE.set(bm.num_free_blocks, **labels)
        m.KV_USED.set(bm.num_usable_blocks - bm.num_free_blocks, **labels)
        deltas.add(m.PREEMPTIONS, "preempt", sched.num_preemptions, **labels)
        deltas.add(m.PREFIX_HITS, "hits", bm.prefix_hits, **labels)
        deltas.add(m.PREFIX_MISSES, "misses", getattr(bm, "prefix_misses", 0), **labels)
    return Sampler(sample, replica, interval_s)


def watch_encoder(server, interval_s: float = INTERVAL_S) -> Sampler:
    """server: an EncodeServer (its `queued` count and its worker's cache counters)."""
    deltas, labels = _Deltas(), {"role": "encode", "replica": server.instance_id}

    def sample():
        cache = server.worker.cache.stats()
        m.INSTANCES.set(1, **labels)
        m.ENCODE_QUEUE.set(server.queued, **labels)
        deltas.add(m.MM_HITS, "hits", cache.hits, **labels)
        deltas.add(m.MM_MISSES, "misses", cache.misses, **labels)
    return Sampler(sample, server.instance_id, interval_s)


def watch_ingress(backend, replica: str, interval_s: float = INTERVAL_S) -> Sampler:
    def sample():
        m.INSTANCES.set(1, role="ingress", replica=replica)
        m.IN_FLIGHT.set(backend.stats().in_flight, replica=replica)
    return Sampler(sample, replica, interval_s)


_local_replicas = itertools.count(1)


def local_replica() -> str:
    """`replica` label of an in-process engine: "local", then "local-2"... (tests run several)."""
    n = next(_local_replicas)
    return "local" if n == 1 else f"local-{n}"


def encoded(role: str, images: int, seconds: float) -> None:
    """One encode call of `images` images took `seconds`: one observation per image."""
    for _ in range(images):
        m.ENCODE_SECONDS.observe(seconds / images, role=role)


def transferred(backend: str, ok: bool | None, nbytes: int = 0, seconds: float = 0.0) -> None:
    """ok None: a receiver starting up — the backend's counters exist at 0 from then on."""
    if ok is None:
        m.TRANSFER_BYTES.inc(0, backend=backend)
        m.TRANSFER_FAILURES.inc(0, backend=backend)
    elif ok:
        m.TRANSFER_BYTES.inc(nbytes, backend=backend)
        m.TRANSFER_SECONDS.observe(seconds, backend=backend)
    else:
        m.TRANSFER_FAILURES.inc(backend=backend)


def role_switching(ready: bool = True, outcome: str = "", seconds: float = 0.0) -> None:
    """ready: a switchable replica started (its switch counters exist at 0); else one switch ended."""
    if ready:
        for o in m.ROLE_SWITCH_OUTCOMES:
            m.ROLE_SWITCHES.inc(0, outcome=o)
    else:
        m.ROLE_SWITCHES.inc(outcome=outcome)
        m.ROLE_SWITCH_SECONDS.observe(seconds, outcome=outcome)


class Stopwatch:
    """`with Stopwatch() as t: ...` then `t.seconds`."""

    __slots__ = ("start", "seconds")

    def __enter__(self):
        self.start, self.seconds = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False
