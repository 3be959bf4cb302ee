"""ClusterBackend: the Backend protocol over the orchestrator — what the ingress replica runs.

Life of a request: admit (RESOURCE_EXHAUSTED past `max_in_flight`) → validate and tokenize with the
checkpoint's processor (no model weights on the ingress) → content-hash each image → orchestrator
drives E → P → D → tokens become deltas through the shared ResponseBuilder, journaled in Redis
before the client sees them; a request resuming a dead ingress's stream starts from that journal
(services/resume.py). A deadline cancels the
orchestration; cancellation travels down the Serve handles, so every stage aborts and frees KV.

Errors keep their meaning across Ray (`client_error`): a TrisectError a stage raised passes as is;
a stage queue over its bound (Serve's BackPressureError) is RESOURCE_EXHAUSTED with a retry-after;
a ValueError (an engine's admission checks: prompt or KV need too big for it) is INVALID_ARGUMENT
with the stage's own message; a lost instance that retries could not replace is UNAVAILABLE, and
so is a stage with no replica to take a call within its `unavailable_after_s` (StageUnavailable);
anything else is a bug: INTERNAL with a generic message naming the request id, the detail (with
Ray's remote traceback) in this replica's log.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import replace

from ray.serve.exceptions import BackPressureError

from services import request_log
from services.api_inputs import Limits, prepare, sampling_params
from services.api_types import GenerateRequest
from services.api_wire import RESUME_HEADER
from services.backend import BackendStats, InFlight, until_deadline
from services.errors import ErrorCode, TrisectError, invalid
from services.orchestrator import Orchestrator, StageUnavailable, TransferFailed, lost_instance, stage_error
from services.response import ResponseBuilder
from services.resume import fingerprint, journal_every, resume_point
from services.stage_loads import Totals

log = logging.getLogger(__name__)
JOURNAL_EVERY = 16


def client_error(e: Exception, request_id: str) -> TrisectError:
    """What the client is told about an exception from the orchestration (see the module doc)."""
    e = stage_error(e)
    if isinstance(e, TrisectError):
        return e
    if isinstance(e, BackPressureError):       # a stage's bounded queue (max_queued_requests) is full
        return TrisectError(ErrorCode.RESOURCE_EXHAUSTED, "server busy: a stage's queue is full; retry after "
                            f"{e.retry_after_s or 1:g} s", retry_after_s=e.retry_after_s or 1.0)
    if isinstance(e, StageUnavailable):         # its message names the stage and the wait, no Ray internals
        log.warning("request %s: %s", request_id, e)
        return TrisectError(ErrorCode.UNAVAILABLE, str(e))
    if isinstance(e, TimeoutError):
        return TrisectError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it finished; "
                            "it was aborted on every stage")
    if isinstance(e, TransferFailed):
        return TrisectError(ErrorCode.UNAVAILABLE, f"KV transfer kept failing: {e}")
    if isinstance(e, ValueError):
        return invalid(str(e), "messages")
    if lost_instance(e):
        log.warning("request %s: instances lost and retries exhausted: %r", request_id, e)
        return TrisectError(ErrorCode.UNAVAILABLE, "the instances serving this request were lost and retries "
                            "ran out; retry later")
    log.error("request %s failed", request_id, exc_info=e)
    return TrisectError(ErrorCode.INTERNAL, f"internal error while serving request {request_id}; "
                        "the details are in the server log")


class ClusterBackend:
    def __init__(self, frontend, orchestrator: Orchestrator, model_name: str, limits: Limits | None = None,
                 rate_limiter=None, journal=None):
        self.frontend = frontend                    # LoadedModel loaded frontend_only
        self.orchestrator = orchestrator
        self.name = model_name
        self.limits = limits or Limits()
        self.rate_limiter, self.journal = rate_limiter, journal    # services/ingress_redis.py, or None
        self._in_flight = InFlight(self.limits.max_in_flight, self.limits.overload_retry_after_s)
        self.loads = None       # services/stage_loads.py: the engines' queues and KV, set by the ingress

    def model_names(self) -> list[str]:
        return [self.name]

    def stats(self) -> BackendStats:
        # engines live in other processes: their figures as last polled from the stage replicas
        t = self.loads.totals() if self.loads is not None else Totals()
        return BackendStats(in_flight=len(self._in_flight), waiting=t.waiting, running=t.running,
                            kv_blocks_used=t.kv_blocks_used, kv_blocks_total=t.kv_blocks_total,
                            max_in_flight=self.limits.max_in_flight)

    async def abort(self, request_id: str) -> None:
        pass        # streams abort by cancellation: the ingress closes the generator

    async def generate(self, req: GenerateRequest):
        if req.model and req.model != self.name:
            raise invalid(f"model {req.model!r} is not served here; available: {self.name}", "model")
        if self.rate_limiter is not None:
            await self.rate_limiter.check(req.api_key)
        self._in_flight.admit(req.request_id)
        request_log.bind(req.request_id)    # the stage calls below carry it: their log lines name it
        rid, state = req.request_id, "failed"
        owner = False                           # this call writes the journal entry (and closes it)
        try:
            prepared = await asyncio.to_thread(prepare, self.frontend, req, self.limits, self.frontend.max_model_len)
            pixels = [(hashlib.sha256(data).hexdigest(), p) for data, p in zip(req.images, prepared.pixel_inputs)]
            sampling = sampling_params(req)
            fp = fingerprint(prepared.token_ids, [h for h, _ in pixels], sampling, req.api_key)
            response = ResponseBuilder(rid, self.frontend.tokenizer, prepared.token_ids, req.stop)
            point = None
            if req.resume_from is not None:     # services/resume.py: the stream of a dead ingress
                if not self.journal:
                    raise invalid("resuming needs the request journal, and this server has no Redis", RESUME_HEADER)
                point = await resume_point(self.journal, rid, req.resume_from, fp, sampling)
                owner = point.finish is None    # a finished entry is only replayed, never rewritten
            tokens = list(point.done) if point else []
            journaled, skip = len(tokens), point.skip if point else 0
            if point:
                had = min(req.resume_from, len(tokens))
                response.add(tokens[:had], None)            # the client has these: detokenizer state only
                if point.finish or len(tokens) > had:
                    delta = response.add(tokens[had:], point.finish or (
                        "length" if len(tokens) >= sampling.max_tokens else None))
                    if response.finished:
                        state = f"finished:{delta.finish_reason}"
                    yield delta
                    if response.finished:
                        return
                elif len(tokens) >= sampling.max_tokens:
                    state = "finished:length"
                    yield response.add([], "length")
                    return
            left = replace(sampling, max_tokens=sampling.max_tokens - len(tokens))
            stream = self.orchestrator.run(point.stage_id(rid) if point else rid, prepared.token_ids + tokens,
                                           left, pixels, deadline=req.deadline)
            if self.journal and point:
                await self.journal.touch(rid, "running")
            elif self.journal:
                owner = True
                await self.journal.open(rid, {"prompt_tokens": len(prepared.token_ids), "max_tokens": req.max_tokens,
                                              "images": [h for h, _ in pixels], "fingerprint": fp})
            every = journal_every(sampling, JOURNAL_EVERY)
            async for item in until_deadline(stream, req.deadline):
                new = item["tokens"]
                tokens += new
                if self.journal and (item["finish_reason"] or len(tokens) - journaled >= every):
                    # before the client sees them (a resume starts from the journal); batched for greedy
                    # requests: a round trip per JOURNAL_EVERY tokens keeps Redis off the per-token path
                    await self.journal.append(rid, journaled, tokens[journaled:])
                    journaled = len(tokens)
                if skip:                        # resumed past the journal: the client has these already
                    k = min(skip, len(new))
                    response.add(new[:k], None)
                    skip, new = skip - k, new[k:]
                    if not new and item["finish_reason"] is None:
                        continue
                delta = response.add(new, item["finish_reason"])
                if response.finished:           # before the yield: a consumer may close us right there
                    state = f"finished:{delta.finish_reason}"
                yield delta
                if response.finished:
                    return
        except Exception as e:
            raise client_error(e, req.request_id) from None
        finally:
            self._in_flight.release(req.request_id)
            if self.journal and owner:
                asyncio.ensure_future(self.journal.close(req.request_id, state))
