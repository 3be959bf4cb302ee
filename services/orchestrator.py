"""Orchestrator: one request's life E → P → D, streamed back as it happens.

    encode   (epd) images split over up to K encode replicas, reassembled in order
    prefill  first token + a KV ticket (pd: the prefill replica encodes the images itself)
    decode   imports the KV, streams the rest; the orchestrator then tells prefill to free
    retry    a failed KV transfer acks FAILED to prefill (blocks freed) and re-prefills on
             another instance, up to `max_retries` times; the client sees one stream. Attempt N
             runs on the stages as `<rid>.aN`: the previous attempt's release may still be on its way
    migrate  a decode instance that dies mid-stream: prompt + the tokens streamed so far are
             re-prefilled on a live instance and decoding continues — one uninterrupted stream
    lost     an encode or prefill instance that dies (or the encoder owning its stored embeddings:
             those are encoded again) is retried on another, up to `max_retries` times
    bounded  a stage call waits at most its stage's `unavailable_after_s` for Serve to assign it to
             a replica (all dead: the handle would hold it until a replacement is up, 25-50 s), and
             never past the request's deadline less DEADLINE_MARGIN_S: then StageUnavailable, which
             the ingress answers UNAVAILABLE — the client hears "no replica" before its deadline
    release  telling prefill to free its KV (after the import, a failed transfer, a cancel) is fire
             and forget: a dead prefill must not hold the stream; the prefill's reaper frees a
             transfer nobody acks anyway
    errors   only a lost instance (`lost_instance`: actor died or unreachable, object lost) is
             retried or migrated; any other exception a stage raises — the request's own fault
             (ValueError, TrisectError) or a bug — fails the request once, as itself: StageClient
             strips Ray's RayTaskError wrapping (`stage_error`), so what reaches the ingress is
             the exception the replica raised, never Ray's traceback text

aggregated mode skips all of that: one replica runs the whole request. Stages are reached through
`StageClient`s, so the same code drives Ray Serve handles or in-process servers (tests).
`router` (a coroutine giving a Route) is the single routing decision point: the Redis-backed
router in cluster mode, none in tests; its replica ids are pinned through Serve's RequestRouter.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Awaitable, Callable

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from cluster.request_router import pinned
from services.follow import NotInRole, follow_moves

log = logging.getLogger(__name__)
MODES = ("aggregated", "pd", "epd")
DEFAULT_UNAVAILABLE_AFTER_S = 10.0
# a stage call stops waiting for a replica this long before the request's deadline, so that the
# client is told UNAVAILABLE (why) rather than DEADLINE_EXCEEDED (when)
DEADLINE_MARGIN_S = 1.0
# RayActorError covers ActorDiedError and ActorUnavailableError; ObjectLostError covers OwnerDiedError,
# ObjectFreedError, ObjectFetchTimedOutError and failed reconstruction; NotInRole: a role switch
# raced the routing decision (services/follow.py)
_LOST = (RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError, NotInRole)


def stage_error(e: BaseException) -> BaseException:
    """The exception the stage replica itself raised. Ray delivers it as RayTaskError(Original): an
    instance of both classes whose str() is Ray's traceback (process id, address, frames) and whose
    `cause` is the original; nested calls (a replica calling another) nest the wrapping."""
    while isinstance(e, RayTaskError) and isinstance(e.cause, BaseException) and e.cause is not e:
        e = e.cause
    return e


class StageUnavailable(RuntimeError):
    """No replica of a stage took a call within its bound: none alive (or all saturated). Not a
    lost instance: the wait for one is over, another retry would only wait again."""


def lost_instance(e: BaseException) -> bool:
    """A replica, or the owner of an object the call needed, is gone: another instance can redo it.
    Nothing else is: a request error fails the same way anywhere, and a bug must not run 3 times."""
    return isinstance(stage_error(e), _LOST)


class StageClient:
    """Calls a stage's methods: a Ray Serve DeploymentHandle or a plain in-process object.

    A handle call waits first for Serve to assign it to a replica — indefinitely, in Serve, when
    none is alive — then for the answer. `unavailable_after_s` bounds the first wait (and a
    `deadline` caps it): past it, StageUnavailable. The answer itself is not bounded here: a
    live replica works as long as it needs (the request's deadline cuts it), a dead one fails it
    at once (ActorDiedError: a lost instance, retried by the orchestrator)."""

    def __init__(self, target, is_handle: bool | None = None, name: str = "stage",
                 unavailable_after_s: float = DEFAULT_UNAVAILABLE_AFTER_S):
        self.target = target
        self.is_handle = hasattr(target, "options") if is_handle is None else is_handle
        self.name, self.unavailable_after_s = name, unavailable_after_s

    async def _assigned(self, response, method: str, deadline: float | None) -> None:
        """Until Serve has given the call a replica, within the bound (see the class doc)."""
        bound = self.unavailable_after_s
        if deadline is not None:
            bound = min(bound, max(0.1, deadline - time.time() - DEADLINE_MARGIN_S))
        try:
            # Ray 2.60: resolves once the router picked a replica (the private part of `await response`)
            await asyncio.wait_for(response._fetch_future_result_async(), bound)
        except asyncio.TimeoutError:
            response.cancel()
            raise StageUnavailable(f"no {self.name} replica could take the request within {bound:.1f} s "
                                   f"({self.name} replicas lost or restarting); retry later") from None

    def _handle(self, pin: str | None, stream: bool = False):
        handle = self.target.options(stream=True) if stream else self.target
        return pinned(handle, pin) if pin else handle

    async def call(self, method: str, *args, pin: str | None = None, deadline: float | None = None):
        """`pin`: a replica id from the router; Serve falls back to its own choice if it is gone.
        `deadline`: the request's (time.time()), caps the wait for a replica."""
        if not self.is_handle:
            return await getattr(self.target, method)(*args)
        response = getattr(self._handle(pin), method).remote(*args)
        try:
            await self._assigned(response, method, deadline)
            return await response
        except RayTaskError as e:
            raise stage_error(e) from e          # chained: the server log keeps Ray's traceback
        except asyncio.CancelledError:
            response.cancel()                    # awaiting it no more does not stop it: stop it
            raise

    async def stream(self, method: str, *args, pin: str | None = None,
                     deadline: float | None = None) -> AsyncIterator:
        if not self.is_handle:
            async for item in getattr(self.target, method)(*args):
                yield item
            return
        response, done = getattr(self._handle(pin, stream=True), method).remote(*args), False
        try:
            await self._assigned(response, method, deadline)
            async for item in response:
                yield item
            done = True
        except RayTaskError as e:
            done = True                              # it ended there: nothing left to cancel
            raise stage_error(e) from e
        finally:
            if not done:
                # left early (a deadline, a dropped client, an error further on): closing this
                # generator does not stop the remote one, which would decode on to max_tokens
                # holding its KV blocks — cancel it, so the stage aborts the request and frees them
                response.cancel()


@dataclass(slots=True)
class Stages:
    aggregated: StageClient | None = None
    encode: StageClient | None = None
    prefill: StageClient | None = None
    decode: StageClient | None = None


@dataclass(slots=True)
class Route:
    """Where a request goes: replica ids per image, for prefill, for decode. None / empty means:
    let Ray Serve's own balancing choose (no router, or the registry has nobody yet)."""
    encoders: list[str | None] = field(default_factory=list)
    prefill: str | None = None
    decode: str | None = None


class TransferFailed(RuntimeError):
    pass


def chunks_by_encoder(pixels: list, route: Route, max_parts: int) -> list[tuple[str | None, list]]:
    """Consecutive images the router sent to one encoder travel together; without a route,
    contiguous balanced chunks over up to `max_parts` encoders."""
    if len(route.encoders) != len(pixels):
        return [(None, c) for c in split_evenly(pixels, max_parts)]
    groups: list[tuple[str | None, list]] = []
    for pin, item in zip(route.encoders, pixels):
        if groups and groups[-1][0] == pin:
            groups[-1][1].append(item)
        else:
            groups.append((pin, [item]))
    return groups


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous, balanced chunks, order kept (chunk i holds items before chunk i+1's)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        chunks.append(items[start:end])
        start = end
    return chunks


@dataclass(slots=True)
class Orchestrator:
    mode: str
    stages: Stages
    max_encoders_per_request: int = 2
    max_retries: int = 2
    transfer_failures: int = 0
    migrations: int = 0
    prefill_failures: int = 0
    encode_failures: int = 0
    releases: set = field(default_factory=set)   # fire-and-forget releases in flight (the loop holds them weakly)
    # (request_id, token_ids, image hashes) -> Route; None: Ray Serve balances on its own
    router: Callable[[str, list[int], list[str]], Awaitable[Route]] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        needed = {"aggregated": ("aggregated",), "pd": ("prefill", "decode"),
                  "epd": ("encode", "prefill", "decode")}[self.mode]
        missing = [s for s in needed if getattr(self.stages, s) is None]
        if missing:
            raise ValueError(f"mode {self.mode} needs stages {missing}")

    async def run(self, rid: str, token_ids: list[int], sampling, pixels: list,
                  deadline: float | None = None) -> AsyncIterator[dict]:
        """pixels: [(content_hash, pixel_inputs)] per image. Yields {"tokens", "finish_reason"}.
        deadline: the request's (time.time()); stage calls stop waiting for a replica before it."""
        route = await self.route(rid, token_ids, pixels)
        if self.mode == "aggregated":
            async for item in self.stages.aggregated.stream("generate", rid, token_ids, sampling, None, pixels,
                                                            pin=route.prefill, deadline=deadline):
                yield item
            return
        images = await self.encode(pixels, route, deadline) if self.mode == "epd" and pixels else None
        generated: list[int] = []                    # tokens the client already has
        reencode = False
        for attempt in range(self.max_retries + 1):
            if attempt:                              # continue elsewhere: ask the router afresh
                route = await self.route(rid, token_ids, pixels)
            # each attempt has its own id on the stages: the last one's release may not have run yet
            sid = f"{rid}.a{attempt}" if attempt else rid
            if reencode:                             # the stored embeddings died with their encoder
                images, reencode = await self.encode(pixels, route, deadline), False
            # a retry or migration re-prefills prompt + everything streamed so far: the next token
            # it samples is exactly the one the lost instance would have produced (greedy)
            left = replace(sampling, max_tokens=sampling.max_tokens - len(generated)) if generated else sampling
            try:
                first = await self.stages.prefill.call("prefill", sid, token_ids + generated, left, images,
                                                        None if images is not None else pixels, pin=route.prefill,
                                                        deadline=deadline)
            except asyncio.CancelledError:
                # cut while prefilling (deadline, client gone): the call is cancelled, but the prefill
                # may have finished already, its KV held for a ticket nobody will receive — free it
                # now, not when the reaper's transfer timeout passes. A task: we are being cancelled.
                self.release(sid, route.prefill, False, "cancelled during prefill")
                raise
            except Exception as e:
                if not lost_instance(e) or attempt == self.max_retries:
                    raise                            # bad input fails the same way anywhere: no retry
                self.prefill_failures += 1
                reencode = images is not None and isinstance(e, ObjectLostError)
                continue
            generated += first["tokens"]
            try:
                yield {"tokens": first["tokens"], "finish_reason": first["finish_reason"]}
            except BaseException:                    # the client left right after this token
                if first["ticket"] is not None:
                    self.release(sid, route.prefill, False, "client left")
                raise
            if first["ticket"] is None:
                return
            try:
                async for item in self._decode(sid, first["ticket"], route):
                    generated += item["tokens"]
                    yield item
                return
            except TransferFailed as e:
                self.transfer_failures += 1
                self.release(sid, route.prefill, False, str(e))
                if attempt == self.max_retries:
                    raise
            except Exception as e:
                if not lost_instance(e) or attempt == self.max_retries:
                    raise                            # not a lost instance: re-prefilling would fail again
                self.migrations += 1                 # the decode instance died mid-stream: migrate

    async def route(self, rid: str, token_ids: list[int], pixels: list) -> Route:
        if self.router is None:
            return Route()
        return await self.router(rid, token_ids, [h for h, _ in pixels])

    def release(self, rid: str, pin: str | None, ok: bool, reason: str = "") -> None:
        """Tell the prefill instance to free rid's KV, without waiting: a task (the caller may be
        being cancelled, or the instance dead — its answer must not hold the stream), errors logged."""
        task = asyncio.ensure_future(self.stages.prefill.call("release", rid, ok, reason, pin=pin))
        self.releases.add(task)
        task.add_done_callback(lambda t: _released(t, rid, self.releases))

    async def released(self) -> None:
        """Until the releases in flight have run (tests; a graceful stop)."""
        while self.releases:
            await asyncio.gather(*list(self.releases), return_exceptions=True)

    async def _decode(self, rid: str, ticket, route: Route) -> AsyncIterator[dict]:
        imported = False
        release = lambda *a: self.release(rid, route.prefill, *a)
        try:
            # follow_moves: a decode instance switching role moves the sequence on (services/follow.py)
            async for item in follow_moves(self.stages.decode, rid, ticket, route.decode):
                if "transfer_failed" in item:
                    raise TransferFailed(item["transfer_failed"])
                if item.get("imported"):
                    imported = True
                    release(True)                    # the decode side has its copy: prefill may free
                    continue
                yield item
        except TransferFailed:
            raise
        except BaseException:
            if not imported:
                # cancelled, or the decode replica died before importing: prefill must still free
                release(False, "decode never imported")
            raise

    async def encode(self, pixels: list, route: Route, deadline: float | None = None) -> list:
        groups = chunks_by_encoder(pixels, route, self.max_encoders_per_request)
        results = await asyncio.gather(*(self._encode_chunk(chunk, pin, deadline) for pin, chunk in groups))
        return [emb for chunk in results for emb in chunk]

    async def _encode_chunk(self, chunk: list, pin: str | None, deadline: float | None) -> list:
        """A lost encoder's chunk goes to another one (Serve's choice), up to `max_retries` times."""
        for attempt in range(self.max_retries + 1):
            try:
                return await self.stages.encode.call("encode", chunk, pin=pin, deadline=deadline)
            except Exception as e:
                if not lost_instance(e) or attempt == self.max_retries:
                    raise
                self.encode_failures += 1
                pin = None                           # the pinned encoder is gone
        raise AssertionError("unreachable")


def _released(task: asyncio.Future, rid: str, pending: set) -> None:
    pending.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("releasing the prefill KV of %s failed (the prefill's reaper frees it once its transfer "
                    "times out): %r", rid, stage_error(task.exception()))
