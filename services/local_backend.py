"""LocalBackend: one in-process engine behind the Backend protocol (`trisect serve --mode local`).

Life of a request: `generate(req)` admits it (RESOURCE_EXHAUSTED past `limits.max_in_flight`),
prepares it on a small worker pool (decode + check images, chat template, context check, vision
encoder) so the event loop never blocks, then streams it through the EngineLoop — the one thread
that owns the Engine — turning engine tokens into deltas with the shared ResponseBuilder. When the
consumer stops early (cancel, deadline, disconnect) the EngineLoop stream's `finally` aborts the
request in the engine, freeing its KV blocks; a deadline is an asyncio timeout around the stream.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import time

from services import stage_metrics
from services.api_inputs import Limits, prepare, sampling_params
from services.api_types import GenerateRequest
from services.backend import BackendStats, InFlight, until_deadline
from services.engine_loop import EngineLoop, EngineStopped
from services.errors import ErrorCode, TrisectError, invalid
from services.response import ResponseBuilder


class LocalBackend:
    def __init__(self, loaded, engine_config=None, limits: Limits | None = None,
                 model_name: str | None = None, prep_workers: int = 1):
        from decoders.engine import Engine

        self.loaded = loaded
        self.limits = limits or Limits()
        self.engine = Engine(loaded, engine_config)
        self.loop = EngineLoop(self.engine)
        self.metrics = stage_metrics.watch_engine(self.engine, "local", stage_metrics.local_replica())
        self.name = model_name or loaded.path.name
        self._vision = None
        if loaded.family != "text":
            from encoders.vision import VisionEncoder
            self._vision = VisionEncoder(loaded)
        self._in_flight = InFlight(self.limits.max_in_flight, self.limits.overload_retry_after_s)
        self._prep = concurrent.futures.ThreadPoolExecutor(prep_workers, "trisect-prep")
        self._accepting = True
        self._closed = False

    # ---- Backend protocol -------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.name]

    def stats(self) -> BackendStats:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        return BackendStats(in_flight=len(self._in_flight), waiting=len(sched.waiting),
                            running=len(sched.running),
                            kv_blocks_used=bm.num_usable_blocks - bm.num_free_blocks,
                            kv_blocks_total=bm.num_usable_blocks,
                            max_in_flight=self.limits.max_in_flight)

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id, TrisectError(ErrorCode.UNAVAILABLE, "the request was aborted"))

    async def generate(self, req: GenerateRequest):
        if req.model and req.model != self.name:
            raise invalid(f"model {req.model!r} is not served here; available: {self.name}", "model")
        if self._closed:
            raise TrisectError(ErrorCode.UNAVAILABLE, "the engine is not running")
        if not self._accepting:
            raise TrisectError(ErrorCode.UNAVAILABLE, "this instance is draining and accepts no "
                               "new requests; retry shortly or on another instance")
        if req.resume_from is not None:
            raise invalid("resuming a stream needs the request journal in Redis (the cluster modes); "
                          "--mode local keeps none", "x-trisect-resume-from")
        rid = req.request_id
        self._in_flight.admit(rid)
        try:
            prep = asyncio.get_running_loop().run_in_executor(self._prep, self._prepare, req)
            remaining = None if req.deadline is None else max(0.0, req.deadline - time.time())
            prepared, images = await asyncio.wait_for(prep, remaining)
            response = ResponseBuilder(rid, self.loaded.tokenizer, prepared.token_ids, req.stop)
            sampling = sampling_params(req)
            start = lambda e: e.add_request(rid, prepared.token_ids, sampling, images=images)
            async for out in until_deadline(self.loop.stream(rid, start), req.deadline):
                yield response.add(out.new_token_ids, out.finish_reason)
                if response.finished:            # a stop string may end it before the engine does:
                    return                       # leaving the stream aborts it there
        except TimeoutError:
            raise TrisectError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it "
                               "finished; it was aborted and its resources freed") from None
        except ValueError as e:                  # the engine's own admission checks (context, KV pool size)
            raise invalid(str(e), "messages") from None
        except EngineStopped as e:
            raise TrisectError(ErrorCode.UNAVAILABLE, str(e)) from None
        except RuntimeError as e:                # the engine loop failed this request (a bug, logged there)
            raise TrisectError(ErrorCode.INTERNAL, f"{e}; see server log") from None
        finally:
            self._in_flight.release(rid)

    def drain(self) -> None:
        """Refuse new requests with UNAVAILABLE (e.g. before a role switch); running ones go on."""
        self._accepting = False

    def resume(self) -> None:
        self._accepting = True

    def close(self) -> None:
        self._closed = True
        self.loop.close()
        self.metrics.close()
        self._prep.shutdown(wait=False, cancel_futures=True)

    def _prepare(self, req: GenerateRequest):
        prepared = prepare(self.loaded, req, self.limits, self.engine.max_model_len)
        images = []
        if prepared.pixel_inputs:
            with stage_metrics.Stopwatch() as took:
                images = self._vision.encode(prepared.pixel_inputs)
            stage_metrics.encoded("local", len(images), took.seconds)
            for img, data in zip(images, req.images):
                # lets the engine's prefix cache reuse blocks holding the same picture
                img.content_hash = hashlib.sha256(data).hexdigest()
        return prepared, images
