"""What the engines behind an ingress hold right now, for its /metrics and `backend.stats()`.

The engines of pd / epd / aggregated modes live in other processes, so the ingress cannot read
their queues and KV pools directly (before this, its gauges read 0 while requests decoded). Life:
the Ingress replica starts one StageLoads over its LLM stages; a task polls each stage's
`stats()` every `interval_s` — several calls per round, because Serve spreads calls over replicas
and each answer names the replica it came from — and keeps the latest answer per replica.
Answers older than `max_age_s` (a replica gone or scaled away) drop out. `totals()` sums them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Totals:
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


class StageLoads:
    def __init__(self, stages: dict, interval_s: float = 0.5, max_age_s: float = 3.0):
        """stages: name → StageClient of a stage whose replicas are LLMServers."""
        if not 0 < interval_s < max_age_s:
            raise ValueError("need 0 < interval_s < max_age_s")
        self.stages, self.interval_s, self.max_age_s = stages, interval_s, max_age_s
        self._latest: dict[str, tuple[float, dict]] = {}      # instance id → (monotonic time, stats)
        self._task: asyncio.Task | None = None

    def start(self) -> "StageLoads":
        self._task = asyncio.get_running_loop().create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            for name, client in self.stages.items():
                known = sum(1 for _, s in self._latest.values() if s.get("stage") == name)
                calls = [asyncio.wait_for(client.call("stats"), self.max_age_s) for _ in range(2 * known + 2)]
                for answer in await asyncio.gather(*calls, return_exceptions=True):
                    if isinstance(answer, dict) and "instance_id" in answer:
                        self._latest[answer["instance_id"]] = (time.monotonic(), {**answer, "stage": name})
                    elif isinstance(answer, BaseException):
                        log.debug("stats of %s failed: %r", name, answer)
            await asyncio.sleep(self.interval_s)

    def totals(self) -> Totals:
        cutoff = time.monotonic() - self.max_age_s
        fresh = [s for t, s in self._latest.values() if t >= cutoff]
        return Totals(waiting=sum(s["waiting"] for s in fresh), running=sum(s["running"] for s in fresh),
                      kv_blocks_used=sum(s["total_blocks"] - s["free_blocks"] for s in fresh),
                      kv_blocks_total=sum(s["total_blocks"] for s in fresh))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
