"""ClusterBackend: the Backend protocol over the orchestrator — what the ingress replica runs.

Life of a request: admit (RESOURCE_EXHAUSTED past `max_in_flight`) → validate and tokenize with the
checkpoint's processor (no model weights on the ingress) → content-hash each image → orchestrator
drives E → P → D → tokens become deltas through the shared ResponseBuilder. A deadline cancels the
orchestration; cancellation travels down the Serve handles, so every stage aborts and frees KV.
"""
from __future__ import annotations

import asyncio
import hashlib

from services.api_inputs import Limits, prepare, sampling_params
from services.api_types import GenerateRequest
from services.backend import BackendStats, InFlight, until_deadline
from services.errors import ErrorCode, TrisectError, invalid
from services.orchestrator import Orchestrator, TransferFailed
from services.response import ResponseBuilder


JOURNAL_EVERY = 16


class ClusterBackend:
    def __init__(self, frontend, orchestrator: Orchestrator, model_name: str, limits: Limits | None = None,
                 rate_limiter=None, journal=None):
        self.frontend = frontend                    # LoadedModel loaded frontend_only
        self.orchestrator = orchestrator
        self.name = model_name
        self.limits = limits or Limits()
        self.rate_limiter, self.journal = rate_limiter, journal    # services/ingress_redis.py, or None
        self._in_flight = InFlight(self.limits.max_in_flight)

    def model_names(self) -> list[str]:
        return [self.name]

    def stats(self) -> BackendStats:
        # engines live in other processes; their block counts are on the stage replicas' stats()
        return BackendStats(in_flight=len(self._in_flight), waiting=0, running=0, kv_blocks_used=0,
                            kv_blocks_total=0, max_in_flight=self.limits.max_in_flight)

    async def abort(self, request_id: str) -> None:
        pass        # streams abort by cancellation: the ingress closes the generator

    async def generate(self, req: GenerateRequest):
        if req.model and req.model != self.name:
            raise invalid(f"model {req.model!r} is not served here; available: {self.name}", "model")
        if self.rate_limiter is not None:
            await self.rate_limiter.check(req.api_key)
        self._in_flight.admit(req.request_id)
        state = "failed"
        try:
            prepared = await asyncio.to_thread(prepare, self.frontend, req, self.limits, self.frontend.max_model_len)
            pixels = [(hashlib.sha256(data).hexdigest(), p) for data, p in zip(req.images, prepared.pixel_inputs)]
            sampling = sampling_params(req)
            response = ResponseBuilder(req.request_id, self.frontend.tokenizer, prepared.token_ids, req.stop)
            stream = self.orchestrator.run(req.request_id, prepared.token_ids, sampling, pixels)
            if self.journal:
                await self.journal.open(req.request_id, {"prompt_tokens": len(prepared.token_ids), "max_tokens":
                                                         req.max_tokens, "images": [h for h, _ in pixels]})
            tokens: list[int] = []
            journaled = 0
            async for item in until_deadline(stream, req.deadline):
                tokens += item["tokens"]
                if self.journal and (item["finish_reason"] or len(tokens) - journaled >= JOURNAL_EVERY):
                    # batched: one round trip per JOURNAL_EVERY tokens keeps Redis off the per-token path
                    await self.journal.append(req.request_id, journaled, tokens[journaled:])
                    journaled = len(tokens)
                delta = response.add(item["tokens"], item["finish_reason"])
                yield delta
                if response.finished:
                    state = "finished"
                    return
        except TimeoutError:
            raise TrisectError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it finished; "
                               "it was aborted on every stage") from None
        except TransferFailed as e:
            raise TrisectError(ErrorCode.UNAVAILABLE, f"KV transfer kept failing: {e}") from None
        except ValueError as e:                        # an engine's admission checks
            raise invalid(str(e), "messages") from None
        finally:
            self._in_flight.release(req.request_id)
            if self.journal:
                asyncio.ensure_future(self.journal.close(req.request_id, state))
