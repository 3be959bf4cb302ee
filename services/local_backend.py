"""LocalBackend: one in-process engine behind the Backend protocol (the aggregated mode).

Life of a request: `generate(req)` admits it (RESOURCE_EXHAUSTED past `limits.max_in_flight`),
prepares it on a small worker pool (decode + check images, chat template, context check, vision
encoder) so the event loop never blocks, then queues an "add" command for the engine thread and
awaits its own asyncio.Queue. The single engine thread owns the Engine (it is not thread-safe): it
drains commands (add / abort), expires deadlines, calls `engine.step()`, detokenizes each new token
with stop strings and hands deltas back with `loop.call_soon_threadsafe` — so any number of event
loops (gRPC, HTTP) can share one backend. When the consumer stops early (cancel, deadline,
disconnect) the generator's `finally` queues an abort: the engine frees the KV blocks and the
request leaves `stats().in_flight` only once the engine thread has really dropped it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from services.api_inputs import Limits, prepare
from services.api_types import GenerateRequest
from services.backend import BackendStats
from services.errors import ErrorCode, TrisectError, invalid
from services.response import ResponseBuilder

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5  # how long an idle engine thread sleeps before re-checking for shutdown


@dataclass(slots=True, eq=False)
class _Live:
    """One admitted request, shared by its consumer (event loop) and the engine thread."""

    req: GenerateRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    response: ResponseBuilder | None = None
    in_engine: bool = False

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass


class LocalBackend:
    def __init__(self, loaded, engine_config=None, limits: Limits | None = None,
                 model_name: str | None = None, prep_workers: int = 1):
        from decoders.engine import Engine

        self.loaded = loaded
        self.limits = limits or Limits()
        self.engine = Engine(loaded, engine_config)
        self.name = model_name or loaded.path.name
        self._vision = None
        if loaded.family != "text":
            from encoders.vision import VisionEncoder
            self._vision = VisionEncoder(loaded)
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._prep = concurrent.futures.ThreadPoolExecutor(prep_workers, "trisect-prep")
        self._closed = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="trisect-engine", daemon=True)
        self._thread.start()

    # ---- Backend protocol (event-loop side) -------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.name]

    def stats(self) -> BackendStats:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        return BackendStats(in_flight=len(self._live), waiting=len(sched.waiting),
                            running=len(sched.running),
                            kv_blocks_used=bm.num_usable_blocks - bm.num_free_blocks,
                            kv_blocks_total=bm.num_usable_blocks,
                            max_in_flight=self.limits.max_in_flight)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def generate(self, req: GenerateRequest):
        if req.model and req.model != self.name:
            raise invalid(f"model {req.model!r} is not served here; available: {self.name}", "model")
        live = _Live(req, asyncio.get_running_loop(), asyncio.Queue())
        self._admit(live)
        finished = False
        try:
            prepared, images = await live.loop.run_in_executor(self._prep, self._prepare, req)
            if self._expired(req):
                raise _deadline()
            live.response = ResponseBuilder(req.request_id, self.loaded.tokenizer, prepared.token_ids,
                                            req.stop, live.arrival)
            self._commands.put(("add", live, prepared.token_ids, images))
            while True:
                item = await live.out.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine thread already dropped the request
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                if live.in_engine or not self._release(live):
                    self._commands.put(("abort", req.request_id))

    def drain(self) -> None:
        """Refuse new requests with UNAVAILABLE (e.g. before a role switch); running ones go on."""
        self._accepting = False

    def resume(self) -> None:
        self._accepting = True

    def close(self) -> None:
        self._closed.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=10)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # ---- admission and preparation --------------------------------------------------------------
    def _admit(self, live: _Live) -> None:
        if self._closed.is_set() or not self._thread.is_alive():
            raise TrisectError(ErrorCode.UNAVAILABLE, "the engine is not running")
        if not self._accepting:
            raise TrisectError(ErrorCode.UNAVAILABLE, "this instance is draining and accepts no "
                               "new requests; retry shortly or on another instance")
        rid = live.req.request_id
        with self._lock:
            if rid in self._live:
                raise invalid(f"request_id {rid!r} is already in flight", "request_id")
            if len(self._live) >= self.limits.max_in_flight:
                raise TrisectError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"server busy: {len(self._live)} requests in flight "
                                   f"(limit {self.limits.max_in_flight}); retry later")
            self._live[rid] = live

    def _release(self, live: _Live) -> bool:
        """Drop a request the engine does not hold; False if the engine thread took it meanwhile."""
        with self._lock:
            if live.in_engine:
                return False
            if self._live.get(live.req.request_id) is live:
                del self._live[live.req.request_id]
            return True

    def _prepare(self, req: GenerateRequest):
        prepared = prepare(self.loaded, req, self.limits, self.engine.max_model_len)
        images = []
        if prepared.pixel_inputs:
            images = self._vision.encode(prepared.pixel_inputs)
            for img, data in zip(images, req.images):
                # lets the engine's prefix cache reuse blocks holding the same picture
                img.content_hash = hashlib.sha256(data).hexdigest()
        return prepared, images

    @staticmethod
    def _expired(req: GenerateRequest) -> bool:
        return req.deadline is not None and time.time() >= req.deadline

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._drain(block=not self.engine.has_unfinished())
                self._expire()
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._on_output(out)
            except Exception:  # a bug must not kill the loop: fail what is in flight, go on
                log.exception("engine step failed; failing all requests in the engine")
                self._fail_all(TrisectError(ErrorCode.INTERNAL, "engine error; see server log"))
        self._fail_all(TrisectError(ErrorCode.UNAVAILABLE, "the server is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, live, token_ids, images = cmd
            self._add(live, token_ids, images)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])
            with self._lock:
                live = self._live.pop(cmd[1], None)
            if live is not None:  # ends the stream of a consumer that is still reading
                live.push(TrisectError(ErrorCode.UNAVAILABLE, "the request was aborted"))

    def _add(self, live: _Live, token_ids: list[int], images: list) -> None:
        from decoders.sampling import SamplingParams

        req = live.req
        with self._lock:
            if self._live.get(req.request_id) is not live:
                return  # the consumer gave up while the command was queued
            live.in_engine = True
        if self._expired(req):
            return self._drop(live, _deadline())
        sampling = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                                  top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                  stop=req.stop, ignore_eos=req.ignore_eos)
        try:
            self.engine.add_request(req.request_id, token_ids, sampling, images=images)
        except ValueError as e:  # the engine's own admission checks (context, KV pool size)
            self._drop(live, invalid(str(e), "messages"))

    def _expire(self) -> None:
        now = time.time()
        with self._lock:
            expired = [lv for lv in self._live.values()
                       if lv.in_engine and lv.req.deadline is not None and now >= lv.req.deadline]
        for live in expired:
            self._drop(live, _deadline())

    def _drop(self, live: _Live, error: TrisectError) -> None:
        """Engine thread: abort a request the engine may hold and tell its consumer why."""
        self.engine.abort(live.req.request_id)
        with self._lock:
            self._live.pop(live.req.request_id, None)
        live.push(error)

    def _fail_all(self, error: TrisectError) -> None:
        with self._lock:
            doomed = [lv for lv in self._live.values() if lv.in_engine]
        for live in doomed:
            self._drop(live, error)

    def _on_output(self, out) -> None:
        live = self._live.get(out.request_id)
        if live is None:
            return  # aborted while this step ran
        delta = live.response.add(out.new_token_ids, out.finish_reason)
        if live.response.stopped_early:
            self.engine.abort(out.request_id)
        if delta.finish_reason is not None:
            with self._lock:
                self._live.pop(out.request_id, None)
        live.push(delta)


def _deadline() -> TrisectError:
    return TrisectError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it "
                        "finished; it was aborted and its resources freed")
