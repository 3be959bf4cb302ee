"""Choose the encoders, the prefill and the decode instance for one request.

Life of a decision (`Router.route`), two Redis round trips:
  1. fetch — one Lua call returns the live instances (only the records written since this router's
     last read travel: it mirrors the registry incrementally), the assignments other ingresses made
     since each instance's last heartbeat, the holders of the request's image hashes and, per
     instance, how deep into the prompt's chained block hashes its KV cache goes (`ClusterView`).
     If Redis is down, the last view is reused (without cache affinity) plus what this router itself
     assigned since; if Redis came back empty, instances not yet re-registered are kept for
     `resync_s`. Routing never stops on an outage.
  2. decide — `decide()`, pure and deterministic for a seeded RNG (unit-tested without Redis):
       prefill: the instance holding the deepest block of the prompt's chained prefix hashes, unless
                it is more than `prefix_threshold` busier than the least loaded; else power-of-two.
       decode:  power-of-two choices on load (aggregated mode: the prefill instance itself).
       encoders: per image, an encoder already holding its embedding (same threshold rule); the
                rest spread over up to `n_encoders_wanted` encoders picked by power-of-two. With no
                encode instances the prefill instance encodes its own images.
  3. commit — one Lua call records the assignment as pending load, so other ingress replicas see it
     before the chosen instances' next heartbeat (no herding on a stale least-loaded instance).
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cluster.redis_store import RedisStore, StoreUnavailable
from cluster.registry import InstanceRecord, RegistryMirror
from cluster.roles import Role

MODES = ("auto", "disaggregated", "aggregated")


class NoRoutableInstance(RuntimeError):
    """No live ACTIVE instance can take this request (ingress: UNAVAILABLE / 503)."""


@dataclass(slots=True)
class RouteRequest:
    image_hashes: list[str] = field(default_factory=list)         # one per image, in prompt order
    prefix_block_hashes: list[str] = field(default_factory=list)  # chained hashes of full prompt blocks
    n_encoders_wanted: int = 1                                    # intra-request encode parallelism

    def __post_init__(self):
        if self.n_encoders_wanted < 1:
            raise ValueError("n_encoders_wanted must be >= 1")
        self.image_hashes, self.prefix_block_hashes = list(self.image_hashes), list(self.prefix_block_hashes)


@dataclass(slots=True)
class RouteDecision:
    encoders: list[str]          # one instance id per image (may repeat)
    prefill: str
    decode: str
    aggregated: bool = False     # prefill == decode, no KV transfer
    cached_images: int = 0       # images sent to an encoder that already holds them
    prefix_blocks: int = 0       # prompt blocks the chosen prefill instance already holds
    stale: bool = False          # decided on the last-known registry (Redis unreachable)


@dataclass(slots=True)
class RouterConfig:
    mode: str = "auto"               # auto: disaggregated when prefill and decode exist, else aggregated
    encoder_threshold: float = 1.0   # load-score slack an affinity pick may have over the least loaded
    prefix_threshold: float = 1.0
    max_prefix_blocks: int = 512     # longer prompts are matched on their first blocks only
    commit: bool = True              # publish assignments as pending load (cross-ingress balance)
    resync_s: float = 3.0            # after Redis lost its data: how long to wait for re-registration

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if min(self.encoder_threshold, self.prefix_threshold, self.max_prefix_blocks, self.resync_s) < 0:
            raise ValueError("thresholds, max_prefix_blocks and resync_s must be >= 0")


@dataclass(slots=True)
class ClusterView:
    records: list[InstanceRecord]
    pending: dict[str, int] = field(default_factory=dict)       # assigned since last heartbeat
    mm_holders: list[list[str]] = field(default_factory=list)   # per image hash: who holds it
    prefix_depth: dict[str, int] = field(default_factory=dict)  # id -> leading prompt blocks held


def load_score(rec: InstanceRecord, pending: int = 0) -> float:
    """Queued work per unit of capacity, plus KV-cache occupancy in [0, 1]. Unitless; the
    thresholds are in the same unit (1.0 = one full capacity's worth of queue)."""
    ld = rec.load
    score = (ld.waiting + ld.running + ld.encode_queue + pending) / rec.info.capacity
    if ld.total_kv_blocks:
        score += 1.0 - ld.free_kv_blocks / ld.total_kv_blocks
    return score


def _p2c(ids: list[str], scores: dict[str, float], rng: random.Random) -> str:
    if len(ids) == 1:
        return ids[0]
    a, b = rng.sample(ids, 2)
    return a if scores[a] <= scores[b] else b


def _pick_prefill(ids, prefix_depth, scores, threshold, rng) -> tuple[str, int]:
    floor = min(scores[i] for i in ids)
    ok = [i for i in ids if prefix_depth.get(i, 0) > 0 and scores[i] <= floor + threshold]
    if ok:
        best = max(ok, key=lambda i: (prefix_depth[i], -scores[i]))
        return best, prefix_depth[best]
    return _p2c(ids, scores, rng), 0


def _pick_encoders(ids, caps, req, mm_holders, scores, threshold, rng) -> tuple[list[str], int]:
    idset, n = set(ids), len(req.image_hashes)
    out: list[str | None] = [None] * n
    hits, same = 0, {}
    for i, h in enumerate(req.image_hashes):
        if h in same:            # a repeated image goes where its twin went
            out[i] = same[h]
            continue
        held = [e for e in (mm_holders[i] if i < len(mm_holders) else ()) if e in idset]
        if held:
            floor = min(scores[e] for e in ids)
            ok = [e for e in sorted(held) if scores[e] <= floor + threshold]
            if ok:
                e = min(ok, key=lambda x: scores[x])
                out[i], same[h] = e, e
                scores[e] += 1.0 / caps[e]   # later images see this one's cost
                hits += 1
    rest = [i for i in range(n) if out[i] is None]
    if rest:
        pool, chosen = list(ids), []
        for _ in range(min(req.n_encoders_wanted, len(ids), len(rest))):
            chosen.append(_p2c(pool, scores, rng))
            pool.remove(chosen[-1])
        for i in rest:
            h = req.image_hashes[i]
            if h not in same:
                same[h] = min(chosen, key=lambda x: scores[x])
                scores[same[h]] += 1.0 / caps[same[h]]
            out[i] = same[h]
    return out, hits


def decide(view: ClusterView, req: RouteRequest, cfg: RouterConfig, rng: random.Random) -> RouteDecision:
    """Pure routing decision over a snapshot. Raises NoRoutableInstance."""
    by_role: dict[Role, list[str]] = {r: [] for r in Role}
    scores, caps = {}, {}
    for rec in sorted(view.records, key=lambda r: r.id):   # fixed order: same view -> same choice
        if rec.routable:
            by_role[rec.info.role].append(rec.id)
            scores[rec.id] = load_score(rec, view.pending.get(rec.id, 0))
            caps[rec.id] = rec.info.capacity
    pre, dec = by_role[Role.PREFILL], by_role[Role.DECODE]
    mode = cfg.mode
    if mode == "auto":
        mode = "disaggregated" if pre and dec else "aggregated"
    if mode == "aggregated":
        pre = dec = by_role[Role.AGGREGATED]
    for role, ids in (("prefill", pre), ("decode", dec)):
        if not ids:
            raise NoRoutableInstance(f"no live {role if mode == 'disaggregated' else 'aggregated'} instance")
    prefill, depth = _pick_prefill(pre, view.prefix_depth, scores, cfg.prefix_threshold, rng)
    decode = prefill if mode == "aggregated" else _p2c(dec, scores, rng)
    encoders, hits = [], 0
    if req.image_hashes:
        if by_role[Role.ENCODE]:
            encoders, hits = _pick_encoders(by_role[Role.ENCODE], caps, req, view.mm_holders, scores,
                                            cfg.encoder_threshold, rng)
        else:
            encoders = [prefill] * len(req.image_hashes)   # no encode pool: prefill encodes in-process
    return RouteDecision(encoders, prefill, decode, mode == "aggregated", hits, depth)


class Router:
    """Routing over the Redis registry; one per ingress replica, many may share one Redis."""

    def __init__(self, store: RedisStore, config: RouterConfig | None = None, seed: int | None = None):
        self.store = store
        self.config = config or RouterConfig()
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._mirror = RegistryMirror()
        self._records: list[InstanceRecord] = []   # last view, for routing through an outage
        self._pending: dict[str, int] = {}
        self._local_pending: Counter = Counter()   # our assignments made on a stale view
        self._resync_until = 0.0
        self._resync_base: dict[str, InstanceRecord] = {}
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="route-commit")

    def fetch(self, req: RouteRequest) -> tuple[ClusterView, bool]:
        """(view, stale). One round trip, or none when Redis is known to be down."""
        blocks = req.prefix_block_hashes[:self.config.max_prefix_blocks]
        try:
            snap = self.store.route_snapshot(req.image_hashes, blocks, since=self._mirror.since)
        except StoreUnavailable:
            with self._lock:
                if not self._mirror.ready:
                    raise NoRoutableInstance("registry unreachable and no snapshot yet") from None
                pending = Counter(self._pending)
                pending.update(self._local_pending)
                return ClusterView(self._records, dict(pending)), True
        with self._lock:
            now, stale = time.monotonic(), False
            if self._mirror.ready and snap.epoch != self._mirror.epoch:
                # Redis came back empty: instances re-register over the next heartbeat interval.
                # Until all have (or resync_s passes), keep those not yet back from the old view.
                self._resync_until = now + self.config.resync_s
                self._resync_base = dict(self._mirror.records)
            records = self._mirror.apply(snap)
            if now < self._resync_until:
                missing = [r for i, r in self._resync_base.items() if i not in self._mirror.records]
                if missing:
                    records, stale = records + missing, True
                else:
                    self._resync_until = 0.0
            self._records, self._pending = records, snap.pending
            self._local_pending.clear()
        return ClusterView(records, snap.pending, snap.mm_holders, snap.prefix_depth), stale

    def route(self, req: RouteRequest, request_id: str | None = None) -> RouteDecision:
        """Thread-safe; raises NoRoutableInstance when no live instance can take the request."""
        view, stale = self.fetch(req)
        with self._lock:
            d = decide(view, req, self.config, self.rng)
        d.stale = stale
        assigned = d.encoders + [d.prefill] + ([] if d.aggregated else [d.decode])
        if stale:
            with self._lock:
                self._local_pending.update(assigned)
        elif self.config.commit:
            # off the decision's critical path: other ingresses see the pending load a round trip later
            self._committer.submit(self._commit, request_id or uuid.uuid4().hex, assigned)
        return d

    def _commit(self, request_id: str, assigned: list[str]) -> None:
        try:
            self.store.commit_assignment(request_id, assigned)
        except StoreUnavailable:
            with self._lock:
                self._local_pending.update(assigned)

    async def aroute(self, req: RouteRequest, request_id: str | None = None) -> RouteDecision:
        """For asyncio ingresses: keep the event loop free during the round trips."""
        return await asyncio.to_thread(self.route, req, request_id)
