"""EngineLoop: one thread owns an Engine; any event loop submits work and awaits its outputs.

The engine is single-threaded by design, so every touch of it — add, import, abort, release,
stats — is a command queued to its thread. Life of a stream: `stream(rid, start)` registers an
asyncio queue for `rid` and queues `start` (e.g. `lambda e: e.add_request(...)`); the thread runs
it, then keeps stepping while work is pending and pushes each StepOutput for `rid` back to the
caller's loop. If `start` raises (the engine's admission checks), that exception ends the stream.
A consumer that stops early (cancel, disconnect) queues an abort, so its KV blocks are freed.

Failures stay with their request: a StepOutput carrying `error` (the engine failed that request
alone — its sampling parameters, its stop check) ends that stream only, with the engine's
exception (a ValueError for the client's fault, which backends answer INVALID_ARGUMENT; else a
RuntimeError), and every other stream goes on. Only an exception out of `engine.step()` itself —
the batch's forward pass, a genuine engine fault — fails every request in the engine.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Any, AsyncIterator, Callable

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5


class EngineStopped(RuntimeError):
    """The loop was closed while the request was still streaming."""


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trisect-engine", daemon=True)
        self._thread.start()

    # ---- caller side ---------------------------------------------------------------------------
    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the engine thread; the future holds its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        return fut

    async def run(self, fn: Callable[[Any], Any]):
        return await asyncio.wrap_future(self.call(fn))

    async def stream(self, request_id: str, start: Callable[[Any], Any]) -> AsyncIterator:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming here")
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        finished = False
        try:
            self._commands.put(("start", request_id, start))
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str, error: BaseException | None = None) -> None:
        """Abort in the engine; a consumer still streaming it gets `error` (or just stops)."""
        def run(engine):
            engine.abort(request_id)
            if error is not None:
                self._push(request_id, error)
        self._commands.put(("call", run, None))

    def close(self) -> None:
        self._closed.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=10)

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._push_step(self.engine.step())
            except Exception:          # a bug must not kill the loop: fail what is in flight, go on
                log.exception("engine step failed; failing every request in the engine")
                for rid in list(self.engine.seqs):
                    self.engine.abort(rid)
                    self._push(rid, RuntimeError("the engine failed while running this request's batch"))
        for rid in list(self._streams):
            self._push(rid, EngineStopped("the engine is shutting down"))

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
        kind = cmd[0]
        if kind == "start":
            _, rid, start = cmd
            if rid not in self._streams:
                return                         # the consumer left before the engine saw it
            try:
                start(self.engine)
            except Exception as e:
                self._push(rid, e)
        elif kind == "call":
            _, fn, fut = cmd
            try:
                result = fn(self.engine)
                if fut is not None:
                    fut.set_result(result)
            except Exception as e:
                if fut is not None:
                    fut.set_exception(e)

    def _push_step(self, outs) -> None:
        # one wake-up of each consumer loop per step, not one per row: each call_soon_threadsafe
        # writes the loop's self-pipe and takes the GIL, a cost paid per step, not per token
        by_loop: dict = {}
        for out in outs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out if out.error is None else out.error))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:               # the consumers' loop is gone
                pass

    def _push(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, out = target
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:                   # the consumer's loop is gone
            pass


def _put_all(puts) -> None:
    for out, item in puts:
        out.put_nowait(item)
