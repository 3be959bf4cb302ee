"""The role controller: watches the shared LLM pool and asks instances to switch role.

Life: every ingress replica runs one `RoleSwitcher` (a daemon thread, `start()`); each tick
(`interval_s`) it tries to hold the Redis lease `roles:<pool>` (cluster/lease.py), and only the
holder acts, so N ingresses make one controller. The holder reads the registry (the pool's live
records: role, state, load), adds the ingress's recent TTFT/TPOT if it has them (`latency_fn`),
and lets the pure planner (cluster/role_policy.py) decide. A decision is executed by writing the
instance's desired role in Redis (`Registry.request_role`) — the instance itself drains, switches
and reports back through its record (services/switchable.py); a cancel withdraws the request.
Every decision is logged with its reason and kept in `decisions`. A new holder (the previous one
died: its lease expired) starts with a cooldown, so a takeover never causes a burst of switches.
Decisions are never made on a stale registry (Redis unreachable).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from cluster.lease import Lease
from cluster.redis_store import RedisStore
from cluster.registry import Registry
from cluster.role_policy import Decision, Signals, SwitchPlanner, SwitchPolicy

log = logging.getLogger(__name__)

LLM_POOL = "llm_pool"


class RoleSwitcher:
    def __init__(self, store: RedisStore, holder: str, policy: SwitchPolicy | None = None, pool: str = LLM_POOL,
                 interval_s: float = 1.0, lease_ttl_s: float = 5.0,
                 latency_fn: Callable[[], tuple[float | None, float | None]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < 2 * interval_s < lease_ttl_s:
            raise ValueError("need 0 < 2 * interval_s < lease_ttl_s: the holder renews well before expiry")
        self.registry = Registry(store)
        self.lease = Lease(store, f"roles:{pool}", holder, lease_ttl_s)
        self.planner = SwitchPlanner(policy or SwitchPolicy())
        self.pool, self.interval_s, self.latency_fn, self.clock = pool, interval_s, latency_fn, clock
        self.decisions: deque[tuple[float, Decision]] = deque(maxlen=100)
        self._was_holder = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> Decision | None:
        """One look at the pool; the decision made (None: not the holder, or nothing to do)."""
        held = self.lease.hold()
        if held and not self._was_holder:
            self.planner.last_switch = self.clock()   # we don't know when the last holder switched
        self._was_holder = held
        if not held:
            return None
        records = [r for r in self.registry.live() if r.info.pool == self.pool]
        if self.registry.stale:
            return None
        ttft, tpot = self.latency_fn() if self.latency_fn else (None, None)
        hold_before = self.planner.last_hold
        d = self.planner.tick(Signals(records, self.clock(), ttft, tpot))
        if d is None:
            if self.planner.last_hold.split(":")[0] != hold_before.split(":")[0]:
                log.debug("role controller holds: %s", self.planner.last_hold)
            return None
        self.registry.request_role(d.instance, d.to_role if d.action == "switch" else None)
        self.decisions.append((time.time(), d))
        log.info("role controller: %s %s %s -> %s: %s", d.action, d.instance, d.from_role.value, d.to_role.value,
                 d.reason)
        return d

    def start(self) -> "RoleSwitcher":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="role-switcher", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:               # the controller must never take its ingress down
                log.exception("role controller tick failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.lease.release()
