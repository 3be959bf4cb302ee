"""Presence: a stage replica's entry in the Redis registry, kept fresh from its own thread.

Life: created in the replica's constructor when the cluster has a Redis URL → registers (id = the
Serve replica id, so the router's choice can be pinned through Serve) → every `interval_s` reads
the replica's load through `load_fn` and heartbeats it → `publish` adds what the replica caches
(image embeddings "mm", prefix KV blocks "px") to the routing indexes → `close` deregisters.
Redis outages are the agent's business: beats fail quietly and re-register when Redis is back.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from cluster.redis_store import RedisStore
from cluster.registry import InstanceInfo, Load, Registry

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, redis_url: str, instance_id: str, role: str, pool: str, capacity: int,
                 load_fn: Callable[[], Load], ttl_s: float = 3.0, interval_s: float = 0.5):
        self.load_fn = load_fn
        self.interval_s = interval_s
        self.agent = Registry(RedisStore(redis_url), ttl_s=ttl_s).register(
            InstanceInfo(instance_id, role, pool=pool, capacity=capacity), load_fn())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"presence-{instance_id}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.agent.update_load(self.load_fn(), flush=True)
            except Exception:                      # a reporting bug must never take the replica down
                log.exception("presence heartbeat failed")

    def publish(self, kind: str, hashes: list[str]) -> None:
        if hashes:
            self.agent.publish(kind, hashes)

    def unpublish(self, kind: str, hashes: list[str]) -> None:
        if hashes:
            self.agent.unpublish(kind, hashes)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.agent.deregister()


def maybe_presence(redis_url: str | None, *args, **kwargs) -> Presence | None:
    """A Presence when the cluster runs with Redis; None (routing by Serve alone) otherwise."""
    if not redis_url:
        return None
    try:
        return Presence(redis_url, *args, **kwargs)
    except Exception:
        log.exception("could not register with Redis at start; serving without a registry entry")
        return None
