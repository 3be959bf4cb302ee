"""What the ingress keeps in Redis besides routing: per-API-key rate limits and the request journal.

RateLimiter: a token bucket per API key (atomic Lua in cluster/redis_store.py, server time); a
request over the limit is refused with RESOURCE_EXHAUSTED and how long to wait (`retry_after_s`:
HTTP Retry-After, gRPC `retry-after` trailing metadata). While Redis is
unreachable requests pass: refusing all traffic because the limiter is down would be worse.

Journal: per request, its state, a fingerprint of what was asked and the tokens streamed so far, so
a client whose ingress died can resume the stream on another (services/resume.py). Writes happen
off the event loop and never fail a request; a read that cannot reach Redis is UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging

from cluster import metrics
from cluster.redis_store import RedisStore, StoreError
from services.errors import ErrorCode, TrisectError

log = logging.getLogger(__name__)


class RateLimiter:
    def __init__(self, store: RedisStore, per_s: float, burst: int):
        if per_s <= 0 or burst < 1:
            raise ValueError("rate limit needs per_s > 0 and burst >= 1")
        self.store, self.per_s, self.burst = store, per_s, burst
        metrics.RATE_LIMITED.inc(0)

    async def check(self, api_key: str | None) -> None:
        try:
            d = await asyncio.to_thread(self.store.rate_limit, api_key or "anonymous", self.burst, self.per_s)
        except StoreError:
            return
        if not d.allowed:
            metrics.RATE_LIMITED.inc()
            raise TrisectError(ErrorCode.RESOURCE_EXHAUSTED, f"rate limit exceeded for this API key "
                               f"({self.per_s:g}/s, burst {self.burst}); retry after {d.retry_after_s:.2f} s",
                               retry_after_s=d.retry_after_s)


class Journal:
    def __init__(self, store: RedisStore):
        self.store = store

    async def _quietly(self, fn, *args, **kwargs) -> None:
        try:
            await asyncio.to_thread(fn, *args, **kwargs)
        except StoreError as e:
            log.debug("journal write skipped: %s", e)

    async def open(self, rid: str, meta: dict) -> None:
        await self._quietly(self.store.journal_open, rid, "running", meta=meta)

    async def append(self, rid: str, start: int, tokens: list[int]) -> None:
        await self._quietly(self.store.journal_append, rid, start, list(tokens))

    async def close(self, rid: str, state: str) -> None:
        await self._quietly(self.store.journal_close, rid, state)

    async def read(self, rid: str):
        try:
            return await asyncio.to_thread(self.store.journal_read, rid)
        except StoreError:
            raise TrisectError(ErrorCode.UNAVAILABLE, "the request journal (Redis) is unreachable; "
                               "cannot resume now, retry shortly") from None

    async def touch(self, rid: str, state: str) -> None:
        await self._quietly(self.store.journal_update, rid, state=state)
