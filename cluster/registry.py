"""Instance registry: who is alive, in which role, how loaded, and what it has cached.

Life of an instance: `Registry(store).register(info, load)` writes its record (id, role, pool, node,
capacity, role state, load) with a TTL and returns an `InstanceAgent`. The agent heartbeats every
ttl/3 (a daemon thread after `start()`, or the owner calls `heartbeat()`); each heartbeat rewrites the
whole record, so load and role updates ride on it and cost no extra round trip. An instance that
stops heartbeating — crashed, partitioned — simply expires: routers stop seeing it within its TTL.
A heartbeat that finds its record gone (TTL lapsed during a stall, or Redis restarted empty)
re-registers and republishes what the instance holds in its caches, so the indexes rebuild.
The heartbeat also returns the role the control plane wants this instance to take (`desired_role`).

Readers (`Registry.live`) keep the last registry they saw: while Redis is down they answer from it
(`stale` is True) so routing continues; on recovery they switch back to fresh data.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from cluster.redis_store import RedisStore, Snapshot, StoreUnavailable
from cluster.roles import Role, RoleState

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InstanceInfo:
    id: str                 # the Ray Serve replica id (unique_id) when the instance is a replica
    role: Role
    pool: str = "default"
    node: str = ""
    capacity: int = 1       # concurrent sequences it is sized for; normalises its load

    def __post_init__(self):
        if not self.id or any(ch.isspace() for ch in self.id):
            raise ValueError(f"instance id must be non-empty without whitespace: {self.id!r}")
        self.role = Role.parse(self.role)
        if self.capacity < 1:
            raise ValueError("capacity must be >= 1")


@dataclass(slots=True)
class Load:
    waiting: int = 0
    running: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    encode_queue: int = 0

    def __post_init__(self):
        if min(self.waiting, self.running, self.free_kv_blocks, self.total_kv_blocks, self.encode_queue) < 0:
            raise ValueError("load figures must be >= 0")
        if self.free_kv_blocks > self.total_kv_blocks:
            raise ValueError("free_kv_blocks > total_kv_blocks")


@dataclass(slots=True)
class InstanceRecord:
    info: InstanceInfo
    load: Load = field(default_factory=Load)
    state: RoleState = RoleState.ACTIVE
    target: Role | None = None          # role being switched to while DRAINING / SWITCHING
    since: float = 0.0                  # unix time of the last role / state change (0: unknown)

    def __post_init__(self):
        self.state = RoleState.parse(self.state)
        self.target = None if self.target is None else Role.parse(self.target)
        if self.since < 0:
            raise ValueError("since must be >= 0")

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def routable(self) -> bool:
        return self.state is RoleState.ACTIVE

    def to_json(self) -> str:
        i = self.info
        return json.dumps({"id": i.id, "role": i.role.value, "pool": i.pool, "node": i.node,
                           "capacity": i.capacity, "state": self.state.value,
                           "target": self.target.value if self.target else None, "since": self.since,
                           "load": asdict(self.load)},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> "InstanceRecord":
        d = json.loads(raw)
        info = InstanceInfo(d["id"], d["role"], d.get("pool", "default"), d.get("node", ""), d.get("capacity", 1))
        return cls(info, Load(**d.get("load", {})), d.get("state", "active"), d.get("target"), d.get("since", 0.0))


class RegistryMirror:
    """A reader's copy of the registry, kept current by incremental snapshots: between two reads
    usually only a few instances heartbeated, so only their records travel and get parsed."""

    def __init__(self):
        self.records: dict[str, InstanceRecord] = {}
        self.epoch, self.version = "", -1

    @property
    def ready(self) -> bool:
        return self.version >= 0

    @property
    def since(self) -> tuple[str, int]:
        return self.epoch, self.version

    def apply(self, snap: Snapshot) -> list[InstanceRecord]:
        """Fold a snapshot in; returns the live records. Not thread-safe: callers hold a lock."""
        if snap.epoch == self.epoch and snap.version < self.version:
            return list(self.records.values())     # an older read finishing late: keep ours
        records = {} if snap.full else self.records
        for iid, raw in snap.records.items():
            try:
                records[iid] = InstanceRecord.from_json(raw)
            except (ValueError, KeyError, TypeError) as e:   # one bad writer must not stop routing
                log.warning("skipping malformed record of %s: %s", iid, e)
        if len(records) != len(snap.live_ids) or not snap.full:
            live = set(snap.live_ids)
            records = {i: r for i, r in records.items() if i in live}
        self.records, self.epoch, self.version = records, snap.epoch, snap.version
        return list(records.values())


class Registry:
    """Cluster-wide view of the instances; also the factory for one instance's agent."""

    def __init__(self, store: RedisStore, ttl_s: float = 3.0):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.store, self.ttl_s = store, ttl_s
        self._mirror = RegistryMirror()
        self._lock = threading.Lock()
        self._last: list[InstanceRecord] = []
        self.stale = False

    def register(self, info: InstanceInfo, load: Load | None = None, heartbeat_s: float | None = None,
                 start: bool = False, state: RoleState | str = RoleState.ACTIVE,
                 target: Role | str | None = None) -> "InstanceAgent":
        """`state`/`target`: e.g. SWITCHING into its first role while the instance still loads (unroutable)."""
        agent = InstanceAgent(self.store, InstanceRecord(info, load or Load(), state, target, time.time()), self.ttl_s,
                              heartbeat_s)
        agent.heartbeat()
        if start:
            agent.start()
        return agent

    def live(self, role: Role | str | None = None) -> list[InstanceRecord]:
        """Live instances (optionally of one role), sorted by id; last-known while Redis is down."""
        try:
            snap = self.store.route_snapshot(since=self._mirror.since)
            with self._lock:
                self._last, self.stale = sorted(self._mirror.apply(snap), key=lambda r: r.id), False
        except StoreUnavailable:
            self.stale = True
        if role is None:
            return list(self._last)
        role = Role.parse(role)
        return [r for r in self._last if r.info.role is role]

    def request_role(self, instance_id: str, role: Role | str | None) -> None:
        """Control plane -> instance: please switch to `role` (None withdraws the request)."""
        self.store.set_desired_role(instance_id, None if role is None else {"role": Role.parse(role).value})

    def desired_roles(self, instance_ids: list[str]) -> dict[str, Role]:
        """The roles asked of these instances and not yet taken up (ids without a request are left out)."""
        want = self.store.get_desired_roles(instance_ids)
        return {i: Role.parse(w["role"]) for i, w in want.items() if w and w.get("role")}


class InstanceAgent:
    """One instance's side of the registry: heartbeats, load/role updates, cache publication."""

    def __init__(self, store: RedisStore, record: InstanceRecord, ttl_s: float, heartbeat_s: float | None = None):
        self.store, self.record, self.ttl_s = store, record, ttl_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else ttl_s / 3
        if not 0 < self.heartbeat_s < ttl_s:
            raise ValueError("need 0 < heartbeat_s < ttl_s, or the record expires between beats")
        self.desired_role: Role | None = None
        self.registrations = 0           # > 1 means it had to re-register (expiry, Redis restart)
        self.on_reregister: list = []    # callbacks(agent), e.g. to republish engine-side state
        self._held = {"mm": OrderedDict(), "px": OrderedDict()}   # what we published, bounded
        self._republish_pending = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self.record.id

    def heartbeat(self) -> bool:
        """Refresh the record; False if Redis is unreachable (the next beat retries)."""
        with self._lock:
            try:
                existed, want = self.store.put_instance(self.id, self.record.to_json(), self.ttl_s)
            except StoreUnavailable:
                return False
            self.desired_role = Role.parse(want["role"]) if want else None
            if not existed:
                self.registrations += 1
                if self.registrations > 1:
                    log.warning("instance %s re-registered (record was gone)", self.id)
                    self._republish_pending = True
                    for cb in list(self.on_reregister):
                        cb(self)
            if self._republish_pending:
                try:
                    self._republish()
                    self._republish_pending = False
                except StoreUnavailable:
                    pass    # next heartbeat tries again
            return True

    def update_load(self, load: Load, flush: bool = False) -> None:
        """Cheap: remembered and sent with the next heartbeat (or now, with flush)."""
        with self._lock:
            self.record.load = load
        if flush:
            self.heartbeat()

    def set_role(self, role: Role | str, state: RoleState | str = RoleState.ACTIVE,
                 target: Role | str | None = None) -> None:
        """Publish a role / role-state change at once (the state machine lives in cluster.roles)."""
        with self._lock:
            old = self.record
            rec = InstanceRecord(InstanceInfo(self.id, role, old.info.pool, old.info.node, old.info.capacity),
                                 old.load, state, target, old.since)
            if (rec.info.role, rec.state, rec.target) != (old.info.role, old.state, old.target):
                rec.since = time.time()
            self.record = rec
        self.heartbeat()

    def clear_desired_role(self) -> None:
        """The instance took up (or refused) the role asked of it: withdraw the request."""
        try:
            self.store.set_desired_role(self.id, None)
            self.desired_role = None
        except StoreUnavailable:
            pass    # the request stays; the instance sees it equals its role and ignores it

    def publish(self, kind: str, hashes: list[str]) -> None:
        """This instance now holds these image embeddings ('mm') or KV prefix blocks ('px')."""
        if kind not in self._held:
            raise ValueError("kind is 'mm' (image embeddings) or 'px' (KV prefix blocks)")
        held = self._held[kind]
        with self._lock:
            for h in hashes:
                held[h] = None
                held.move_to_end(h)
            while len(held) > self.store.config.index_cap:
                held.popitem(last=False)
        try:
            self.store.index_add(kind, self.id, list(hashes))
        except StoreUnavailable:
            pass    # republished on re-registration

    def unpublish(self, kind: str, hashes: list[str]) -> None:
        with self._lock:
            for h in hashes:
                self._held[kind].pop(h, None)
        try:
            self.store.index_remove(kind, self.id, list(hashes))
        except StoreUnavailable:
            pass

    def _republish(self) -> None:
        for kind, held in self._held.items():
            hashes = list(held)
            for i in range(0, len(hashes), 1000):
                self.store.index_add(kind, self.id, hashes[i:i + 1000])

    def start(self) -> "InstanceAgent":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.id}", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception:   # never let the heartbeat thread die silently
                log.exception("heartbeat of %s failed", self.id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def deregister(self) -> None:
        """Clean exit: disappear from routing now rather than at TTL expiry."""
        self.stop()
        try:
            self.store.delete_instance(self.id)
        except StoreUnavailable:
            pass    # it expires on its own
