"""The only module that talks to Redis.

Life of a store: built from a URL (`redis://`, `rediss://` for TLS, `unix://`; password and ACL user
ride in the URL and go straight to redis-py's from_url). Nothing connects until the first call.
Every call goes through `_call`: redis-py retries a connection error a couple of times with
exponential backoff, and if it still fails the store *opens a circuit* for a short, doubling while
(50 ms .. 1 s) so that callers — routers in particular — fall back to their last-known state at once
instead of each paying a connect timeout. The first call after the circuit closes reconnects; Lua
scripts are re-loaded by redis-py (NOSCRIPT) after a Redis restart.

Key layout, all under "<namespace>:" (so several clusters or tests share one server safely):
    recs               HASH  instance id -> record (JSON, written by its owner at each heartbeat)
    alive              ZSET  instance id -> expiry ms; an instance past it is dead and pruned
    ver, chg           STR, ZSET  registry version; id -> version of its last write, so a reader
                             that knows version v fetches only the records written since v
    epoch              STR   random name of this Redis lifetime: a new one means data was lost
    want:<id>          STR   role the control plane asks that instance to take (JSON)
    lease:<name>       STR   holder of a lease (the role controller's), expires unless renewed
    pend:<id>, pendn   ZSET, HASH  assignments made since its last heartbeat (-> server ms); counts
    mm, px             HASH  cache index, image hash / KV block hash -> JSON [[instance id, ms], ..]
    mmidx, pxidx       ZSET  hash -> last publish ms; bounds each index (cap) and ages it out (TTL)
    job:<rid>          HASH  request journal: state, assignment, meta (JSON), n_tokens, times
    jobtok:<rid>       LIST  generated tokens, one JSON array per append
    rl:<sha(key)>      HASH  token bucket of one API key (tokens, ts)
Payloads are JSON only (never pickle), tensors never come here. Every key has a TTL or a bound.
Scripts read dynamic keys, so this targets one Redis (or a primary/replica pair), not Redis Cluster.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.retry import Retry

from cluster import metrics
from cluster.redis_lua import SCRIPTS as _SCRIPTS

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """Redis answered with an error (bad script input, journal gap...)."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached now (or failed very recently: circuit open)."""


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    u = urlsplit(url)
    if u.password is None:
        return url
    user = u.username or ""
    return u._replace(netloc=f"{user}:***@{u.hostname}" + (f":{u.port}" if u.port else "")).geturl()


@dataclass(slots=True)
class StoreConfig:
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "trisect"
    connect_timeout_s: float = 0.5       # loopback/LAN: a slow connect means trouble, fail over
    socket_timeout_s: float = 1.0
    retries: int = 2                     # redis-py's own retries, with exponential backoff
    backoff_base_s: float = 0.01
    backoff_cap_s: float = 0.2
    health_check_interval_s: int = 30    # PING a connection idle longer than this before use
    circuit_min_s: float = 0.05
    circuit_max_s: float = 1.0
    index_ttl_s: float = 600.0
    index_cap: int = 100_000             # hashes per index (mm, px)
    index_holders_cap: int = 16          # instances remembered per hash
    pending_grace_ms: int = 100          # assignments this young survive a heartbeat (in transit)
    pending_window_ms: int = 10_000

    def __post_init__(self):
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {scheme!r} in {redact_url(self.url)}")
        if not self.namespace or ":" in self.namespace:
            raise ValueError("namespace must be non-empty and contain no ':'")
        if self.retries < 0 or self.index_cap < 1 or self.index_holders_cap < 1:
            raise ValueError("retries >= 0, index_cap >= 1, index_holders_cap >= 1")
        if not 0 < self.circuit_min_s <= self.circuit_max_s:
            raise ValueError("need 0 < circuit_min_s <= circuit_max_s")


@dataclass(slots=True)
class Snapshot:
    live_ids: list[str]               # every live instance
    records: dict[str, str]           # id -> record JSON: all of them if `full`, else those written since
    full: bool
    pending: dict[str, int]           # id -> assignments since its last heartbeat (non-zero only)
    mm_holders: list[list[str]]       # per image hash asked: instance ids holding its embedding
    prefix_depth: dict[str, int]      # instance id -> how many leading blocks of the prompt it holds
    epoch: str                        # changes when Redis lost its data (restart without AOF)
    version: int


@dataclass(slots=True)
class JournalEntry:
    request_id: str
    state: str
    assignment: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    created_ms: int = 0
    updated_ms: int = 0


@dataclass(slots=True)
class RateDecision:
    allowed: bool
    remaining: float
    retry_after_s: float      # 0 when allowed


_BASES = {"redis": Connection, "rediss": SSLConnection, "unix": UnixDomainSocketConnection}


def _counting_class(scheme: str, counter: list[int]):
    """A connection class that counts writes to the socket = Redis round trips (a pipeline is one)."""
    base = _BASES[scheme]

    class Counting(base):
        def send_packed_command(self, command, check_health=True):
            counter[0] += 1
            return super().send_packed_command(command, check_health)
    return Counting


def _now_ms() -> int:
    return int(time.time() * 1000)



class RedisStore:
    def __init__(self, config: StoreConfig | str):
        self.config = config if isinstance(config, StoreConfig) else StoreConfig(url=config)
        c = self.config
        self.prefix = c.namespace + ":"
        self._rt = [0]
        self.client = redis.Redis.from_url(
            c.url, decode_responses=True,
            connection_class=_counting_class(urlsplit(c.url).scheme, self._rt),
            socket_connect_timeout=c.connect_timeout_s, socket_timeout=c.socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=c.backoff_cap_s, base=c.backoff_base_s), c.retries),
            health_check_interval=c.health_check_interval_s)
        self._scripts = {name: self.client.register_script(src) for name, src in _SCRIPTS.items()}
        self._down_until = 0.0
        self._backoff = c.circuit_min_s
        metrics.REDIS_OUTAGES.inc(0)

    # ------------------------------------------------------------------ plumbing
    @property
    def round_trips(self) -> int:
        return self._rt[0]

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _call(self, fn, *args, **kwargs):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"redis at {redact_url(self.config.url)} unavailable (circuit open)")
        try:
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            metrics.REDIS_SECONDS.observe(time.perf_counter() - started)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._down_until = time.monotonic() + self._backoff
            if self._backoff == self.config.circuit_min_s:
                metrics.REDIS_OUTAGES.inc()
                log.warning("redis at %s unreachable: %s", redact_url(self.config.url), e)
            self._backoff = min(self._backoff * 2, self.config.circuit_max_s)
            raise StoreUnavailable(f"redis at {redact_url(self.config.url)}: {e}") from e
        except redis.ResponseError as e:
            raise StoreError(str(e)) from e
        if self._backoff != self.config.circuit_min_s:
            log.warning("redis at %s reachable again", redact_url(self.config.url))
            self._backoff = self.config.circuit_min_s
        return out

    def _script(self, name: str, keys=(), args=()):
        return self._call(self._scripts[name], keys=list(keys), args=list(args))

    def ping(self) -> bool:
        try:
            return bool(self._call(self.client.ping))
        except StoreUnavailable:
            return False

    def close(self) -> None:
        self.client.close()

    def clear(self) -> int:
        """Delete every key of this namespace (tests; tooling that resets a cluster's state)."""
        keys = list(self._call(lambda: list(self.client.scan_iter(match=self.prefix + "*", count=1000))))
        for i in range(0, len(keys), 500):
            self._call(self.client.delete, *keys[i:i + 500])
        return len(keys)

    # ------------------------------------------------------------------ instances
    def put_instance(self, instance_id: str, record_json: str, ttl_s: float) -> tuple[bool, dict | None]:
        """Write/refresh an instance record (register + heartbeat + load in one round trip).
        Returns (it was alive before, role the control plane wants it to take or None)."""
        existed, want = self._script("heartbeat", args=(
            self.prefix, instance_id, record_json, ttl_ms(ttl_s), self.config.pending_grace_ms))
        return bool(existed), (json.loads(want) if want else None)

    def delete_instance(self, instance_id: str) -> None:
        p = self.client.pipeline(transaction=True)
        p.hdel(self.key("recs"), instance_id)
        p.hdel(self.key("pendn"), instance_id)
        p.zrem(self.key("alive"), instance_id)
        p.zrem(self.key("chg"), instance_id)
        p.delete(self.key("pend", instance_id), self.key("want", instance_id))
        self._call(p.execute)

    def set_desired_role(self, instance_id: str, payload: dict | None, ttl_s: float = 600.0) -> None:
        if payload is None:
            self._call(self.client.delete, self.key("want", instance_id))
        else:
            self._call(self.client.set, self.key("want", instance_id), json.dumps(payload), px=ttl_ms(ttl_s))

    def get_desired_roles(self, instance_ids: list[str]) -> dict[str, dict]:
        if not instance_ids:
            return {}
        raw = self._call(self.client.mget, [self.key("want", i) for i in instance_ids])
        return {i: json.loads(w) for i, w in zip(instance_ids, raw) if w}

    def route_snapshot(self, image_hashes=(), block_hashes=(), since: tuple[str, int] = ("", -1)) -> Snapshot:
        """One round trip: live instances, records written since `since` = (epoch, version) (all of
        them if that is unknown or stale), pending assignments, cache-index holders of the hashes."""
        image_hashes, block_hashes = list(image_hashes), list(block_hashes)
        raw = self._script("snapshot", args=[self.prefix, len(image_hashes), uuid.uuid4().hex, since[0], since[1],
                                             int(self.config.index_ttl_s * 1000), *image_hashes, *block_hashes])
        ids, recs, pend, mm, depth, epoch, ver, full = json.loads(raw)
        # cjson writes an empty Lua table as {}: `or []` turns those back into lists.
        recs, pend, depth = recs or [], pend or [], depth or []
        return Snapshot(ids or [], dict(zip(recs[::2], recs[1::2])), full,
                        {i: int(n) for i, n in zip(pend[::2], pend[1::2]) if n != "0"},
                        [h or [] for h in mm or []], dict(zip(depth[::2], depth[1::2])), epoch, int(ver))

    def commit_assignment(self, request_id: str, instance_ids: list[str]) -> None:
        """Record that `request_id` was sent to these instances (one entry per occurrence), so every
        ingress counts it as load until the instance's next heartbeat reflects it."""
        if instance_ids:
            self._script("commit", args=[self.prefix, request_id, self.config.pending_window_ms, *instance_ids])

    # ------------------------------------------------------------------ leases
    def lease_hold(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease `name` if free (SET NX PX), or renew it if `holder` has it (compare-and-set
        in Lua: never extends someone else's). True while `holder` holds it for the next ttl_s."""
        k, ms = self.key("lease", name), ttl_ms(ttl_s)
        if int(self._script("lease_renew", keys=[k], args=[holder, ms])):
            return True
        return bool(self._call(self.client.set, k, holder, nx=True, px=ms))

    def lease_release(self, name: str, holder: str) -> bool:
        return bool(int(self._script("lease_release", keys=[self.key("lease", name)], args=[holder])))

    def lease_holder(self, name: str) -> tuple[str | None, float]:
        """(holder, seconds left) of the lease; (None, 0) when nobody holds it."""
        p = self.client.pipeline(transaction=True)
        p.get(self.key("lease", name))
        p.pttl(self.key("lease", name))
        holder, left = self._call(p.execute)
        return (holder, max(0, left) / 1000) if holder else (None, 0.0)

    # ------------------------------------------------------------------ cache indexes
    def index_add(self, kind: str, instance_id: str, hashes: list[str]) -> int:
        """Publish that `instance_id` holds these hashes; returns how many old hashes were evicted."""
        return self._index_update(kind, instance_id, hashes, add=True)

    def index_remove(self, kind: str, instance_id: str, hashes: list[str]) -> int:
        return self._index_update(kind, instance_id, hashes, add=False)

    def _index_update(self, kind: str, instance_id: str, hashes: list[str], add: bool) -> int:
        if kind not in ("mm", "px"):
            raise ValueError("kind is 'mm' (image embeddings) or 'px' (KV prefix blocks)")
        if not hashes:
            return 0
        c = self.config
        return int(self._script("index_update", args=[self.prefix, kind, instance_id, int(c.index_ttl_s * 1000),
                                                      c.index_cap, c.index_holders_cap, int(add), *hashes]))

    def index_size(self, kind: str) -> int:
        return int(self._call(self.client.zcard, self.key(kind + "idx")))

    # ------------------------------------------------------------------ request journal
    def journal_open(self, request_id: str, state: str, meta: dict | None = None,
                     assignment: dict | None = None, ttl_s: float = 3600.0) -> None:
        k, now = self.key("job", request_id), _now_ms()
        p = self.client.pipeline(transaction=True)
        p.delete(k, self.key("jobtok", request_id))
        p.hset(k, mapping={"state": state, "meta": json.dumps(meta or {}), "n_tokens": 0,
                           "assignment": json.dumps(assignment or {}), "created_ms": now, "updated_ms": now})
        p.pexpire(k, ttl_ms(ttl_s))
        self._call(p.execute)

    def journal_update(self, request_id: str, state: str | None = None, assignment: dict | None = None,
                       ttl_s: float = 3600.0) -> bool:
        """Change state and/or assignment; False if the entry is gone (expired or never opened)."""
        fields: dict = {"updated_ms": _now_ms()}
        if state is not None:
            fields["state"] = state
        if assignment is not None:
            fields["assignment"] = json.dumps(assignment)
        flat = [x for kv in fields.items() for x in kv]
        return bool(self._script("journal_update", keys=[self.key("job", request_id), self.key("jobtok", request_id)],
                                 args=[ttl_ms(ttl_s), *flat]))

    def journal_append(self, request_id: str, start: int, tokens: list[int], ttl_s: float = 3600.0) -> int:
        """Append tokens[i] as token number start+i. Idempotent: a retried append is a no-op, an
        overlapping one adds only the new tail, a gap is an error. Returns the journal's token count
        (-1 if the entry is gone)."""
        if start < 0:
            raise ValueError("start must be >= 0")
        return int(self._script("journal_append", keys=[self.key("job", request_id), self.key("jobtok", request_id)],
                                args=[start, len(tokens), json.dumps([int(t) for t in tokens]),
                                      ttl_ms(ttl_s), _now_ms()]))

    def journal_read(self, request_id: str) -> JournalEntry | None:
        p = self.client.pipeline(transaction=True)
        p.hgetall(self.key("job", request_id))
        p.lrange(self.key("jobtok", request_id), 0, -1)
        h, chunks = self._call(p.execute)
        if not h:
            return None
        return JournalEntry(request_id=request_id, state=h["state"], assignment=json.loads(h["assignment"]),
                            meta=json.loads(h["meta"]), tokens=[t for c in chunks for t in json.loads(c)],
                            created_ms=int(h["created_ms"]), updated_ms=int(h["updated_ms"]))

    def journal_close(self, request_id: str, state: str = "finished", keep_s: float = 60.0) -> bool:
        """Final state; keep the entry a short while for late readers, then let it expire."""
        return self.journal_update(request_id, state=state, ttl_s=keep_s)

    # ------------------------------------------------------------------ rate limiting
    def rate_limit(self, api_key: str, capacity: float, refill_per_s: float, cost: float = 1.0) -> RateDecision:
        """Token bucket per API key, atomic in Lua on server time (no client clock skew)."""
        if not 0 < cost <= capacity or refill_per_s <= 0:
            raise ValueError("need 0 < cost <= capacity and refill_per_s > 0")
        # The key name holds a digest, never the API key itself.
        k = self.key("rl", hashlib.sha256(api_key.encode()).hexdigest()[:32])
        allowed, remaining, retry_ms = self._script("rate_limit", keys=[k], args=[capacity, refill_per_s, cost])
        return RateDecision(bool(allowed), float(remaining), int(retry_ms) / 1000.0)


def ttl_ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
