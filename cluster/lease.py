"""A lease in Redis: at most one holder at a time, handed over when its holder dies.

Life: every candidate (each ingress replica's role controller) calls `hold()` once per tick. The
first to find the key free takes it (SET NX PX); its later `hold()`s renew it through a Lua
compare-and-set, so nobody can extend or release a lease they do not hold. A holder that dies or
stalls stops renewing: the key expires after `ttl_s` and the next candidate's `hold()` takes it.
A holder acts only in the tick whose `hold()` said True and ticks far more often than the TTL,
so two holders never act together (Redis down: `hold()` is False — when unsure, nobody acts).
"""
from __future__ import annotations

import logging

from cluster.redis_store import RedisStore, StoreUnavailable

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, store: RedisStore, name: str, holder: str, ttl_s: float = 5.0):
        if not name or not holder or ttl_s <= 0:
            raise ValueError("a lease needs a name, a holder and ttl_s > 0")
        self.store, self.name, self.holder, self.ttl_s = store, name, holder, ttl_s
        self.held = False

    def hold(self) -> bool:
        try:
            held = self.store.lease_hold(self.name, self.holder, self.ttl_s)
        except StoreUnavailable:
            held = False
        if held != self.held:
            log.info("%s %s lease %r", self.holder, "took" if held else "lost", self.name)
        self.held = held
        return held

    def release(self) -> None:
        if self.held:
            try:
                self.store.lease_release(self.name, self.holder)
            except StoreUnavailable:
                pass        # it expires on its own
            self.held = False
