"""What the ingresses need from whatever actually runs requests.

Life: `trisect serve` builds one Backend — `LocalBackend` (one in-process engine, aggregated) today,
the Ray Serve orchestrator (PD / EPD, Redis-routed) later — and hands it to the gRPC and HTTP
ingresses, which only ever call these four methods. So the serving mode never leaks into the API.

Contract for implementers:
- `generate(req)` is an async generator of GenerateDelta; the last one has `finish_reason` set.
  Errors a client can cause are raised as TrisectError (before or during the stream). If the
  consumer stops iterating (client cancelled, deadline passed) the generator's `finally` must free
  everything the request holds — on every stage — just as `abort(request_id)` does.
- `abort(request_id)` is idempotent and harmless for unknown ids.
- `stats()` is cheap and exact enough for tests to prove nothing leaks: after all streams end,
  `in_flight == waiting == running == kv_blocks_used == 0`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from services.api_types import GenerateDelta, GenerateRequest


@dataclass(slots=True, frozen=True)
class BackendStats:
    in_flight: int       # requests admitted by the backend and not yet finished (incl. preparing)
    waiting: int         # sequences queued inside engines, not yet scheduled
    running: int         # sequences being prefilled/decoded
    kv_blocks_used: int  # KV blocks held by sequences (prefix-cache-only blocks excluded)
    kv_blocks_total: int
    max_in_flight: int   # admission limit; beyond it requests get RESOURCE_EXHAUSTED

    def __post_init__(self):
        for name in ("in_flight", "waiting", "running", "kv_blocks_used", "kv_blocks_total",
                     "max_in_flight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative")

    @property
    def idle(self) -> bool:
        """Nothing admitted, queued, running or holding KV blocks."""
        return not (self.in_flight or self.waiting or self.running or self.kv_blocks_used)

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in self.__slots__}


@runtime_checkable
class Backend(Protocol):
    def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """Async generator (declare as `async def ... yield`) streaming the request's deltas."""
        ...

    async def abort(self, request_id: str) -> None:
        ...

    def model_names(self) -> list[str]:
        ...

    def stats(self) -> BackendStats:
        ...


class InFlight:
    """Admission for a backend: refuses duplicate ids and, past `limit`, more requests
    (RESOURCE_EXHAUSTED with `retry_after_s` — backpressure instead of an unbounded queue; the
    refusal costs a set lookup, so a burst far past capacity is turned away at once).
    `refused` counts refusals and `peak` the most ever admitted at once (tests prove the bound)."""

    __slots__ = ("limit", "retry_after_s", "_ids", "refused", "peak")

    def __init__(self, limit: int, retry_after_s: float = 1.0):
        self.limit, self.retry_after_s, self._ids = limit, retry_after_s, set()
        self.refused = self.peak = 0

    def admit(self, request_id: str) -> None:
        from services.errors import ErrorCode, TrisectError, invalid
        if request_id in self._ids:
            raise invalid(f"request_id {request_id!r} is already in flight", "request_id")
        if len(self._ids) >= self.limit:
            self.refused += 1
            raise TrisectError(ErrorCode.RESOURCE_EXHAUSTED, f"server busy: {len(self._ids)} requests in flight "
                               f"(limit {self.limit}); retry after {self.retry_after_s:g} s",
                               retry_after_s=self.retry_after_s)
        self._ids.add(request_id)
        self.peak = max(self.peak, len(self._ids))

    def release(self, request_id: str) -> None:
        self._ids.discard(request_id)

    def __len__(self) -> int:
        return len(self._ids)


async def until_deadline(stream: AsyncIterator, deadline: float | None) -> AsyncIterator:
    """Items of `stream` until the wall-clock `deadline` (time.time()), then TimeoutError.

    Per-item `wait_for`, not `asyncio.timeout` around the loop: a backend's generator may be
    advanced by different tasks (an ingress awaits the first delta in its handler and the rest in
    a collector task), and `asyncio.timeout` would cancel whichever task entered it first."""
    import asyncio
    import time
    try:
        while True:
            remaining = None if deadline is None else deadline - time.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            try:
                item = await asyncio.wait_for(anext(stream), remaining)
            except StopAsyncIteration:
                return
            yield item
    finally:
        await stream.aclose()                # a stream left early aborts its request upstream
