"""RedisRouting: the orchestrator's routing hook backed by the Redis router (cluster/router.py).

Per request: image content hashes + the prompt's leading text-block hashes (the same chained
hashes the engines' prefix caches register) → one routing decision (≤ 3 Redis round trips, or
none during an outage: the router answers from its last snapshot) → replica ids the orchestrator
pins through Serve. If the registry knows nobody yet — replicas still registering — the route is
empty and Ray Serve balances by itself: routing can degrade, requests are never refused for it.
"""
from __future__ import annotations

import logging

from cluster.redis_store import RedisStore
from cluster.router import NoRoutableInstance, RouteRequest, Router, RouterConfig
from decoders.block_manager import text_prefix_hashes
from services.orchestrator import Route

log = logging.getLogger(__name__)


class RedisRouting:
    def __init__(self, redis_url: str, mode: str, block_size: int, image_token_id: int | None,
                 encoders_per_request: int = 2):
        self.router = Router(RedisStore(redis_url), RouterConfig(
            mode="aggregated" if mode == "aggregated" else "disaggregated"))
        self.block_size, self.image_token_id = block_size, image_token_id
        self.encoders_per_request = encoders_per_request
        self.unrouted = 0                     # decisions left to Serve (empty registry)

    async def __call__(self, rid: str, token_ids: list[int], image_hashes: list[str]) -> Route:
        prefix = [h.hex() for h in text_prefix_hashes(token_ids, self.block_size, self.image_token_id)]
        req = RouteRequest(image_hashes, prefix, max(1, min(self.encoders_per_request, len(image_hashes))))
        try:
            d = await self.router.aroute(req, rid)
        except NoRoutableInstance as e:
            self.unrouted += 1
            log.info("routing %s by Serve alone: %s", rid, e)
            return Route()
        return Route(encoders=list(d.encoders), prefill=d.prefill, decode=d.prefill if d.aggregated else d.decode)
