"""Orchestrator: one request's life E → P → D, streamed back as it happens.

    encode   (epd) images split over up to K encode replicas, reassembled in order
    prefill  first token + a KV ticket (pd: the prefill replica encodes the images itself)
    decode   imports the KV, streams the rest; the orchestrator then tells prefill to free
    retry    a failed KV transfer acks FAILED to prefill (blocks freed) and re-prefills on
             another instance, up to `max_retries` times; the client sees one stream
    migrate  a decode instance that dies mid-stream: prompt + the tokens streamed so far are
             re-prefilled on a live instance and decoding continues — one uninterrupted stream
    lost     a prefill instance that dies (or the encoder owning its stored embeddings: those are
             encoded again) is retried on another
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
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Awaitable, Callable

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from cluster.request_router import pinned
from services.follow import NotInRole, follow_moves

MODES = ("aggregated", "pd", "epd")
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


def lost_instance(e: BaseException) -> bool:
    """A replica, or the owner of an object the call needed, is gone: another instance can redo it.
    Nothing else is: a request error fails the same way anywhere, and a bug must not run 3 times."""
    return isinstance(stage_error(e), _LOST)


class StageClient:
    """Calls a stage's methods: a Ray Serve DeploymentHandle or a plain in-process object."""

    def __init__(self, target, is_handle: bool | None = None):
        self.target = target
        self.is_handle = hasattr(target, "options") if is_handle is None else is_handle

    def _handle(self, pin: str | None, stream: bool = False):
        handle = self.target.options(stream=True) if stream else self.target
        return pinned(handle, pin) if pin else handle

    async def call(self, method: str, *args, pin: str | None = None):
        """`pin`: a replica id from the router; Serve falls back to its own choice if it is gone."""
        if not self.is_handle:
            return await getattr(self.target, method)(*args)
        response = getattr(self._handle(pin), method).remote(*args)
        try:
            return await response
        except RayTaskError as e:
            raise stage_error(e) from e          # chained: the server log keeps Ray's traceback
        except asyncio.CancelledError:
            response.cancel()                    # awaiting it no more does not stop it: stop it
            raise

    async def stream(self, method: str, *args, pin: str | None = None) -> AsyncIterator:
        if not self.is_handle:
            async for item in getattr(self.target, method)(*args):
                yield item
            return
        response, done = getattr(self._handle(pin, stream=True), method).remote(*args), False
        try:
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

    async def run(self, rid: str, token_ids: list[int], sampling, pixels: list) -> AsyncIterator[dict]:
        """pixels: [(content_hash, pixel_inputs)] per image. Yields {"tokens", "finish_reason"}."""
        route = await self.route(rid, token_ids, pixels)
        if self.mode == "aggregated":
            async for item in self.stages.aggregated.stream("generate", rid, token_ids, sampling, None, pixels,
                                                            pin=route.prefill):
                yield item
            return
        images = await self.encode(pixels, route) if self.mode == "epd" and pixels else None
        generated: list[int] = []                    # tokens the client already has
        reencode = False
        for attempt in range(self.max_retries + 1):
            if attempt:                              # continue elsewhere: ask the router afresh
                route = await self.route(rid, token_ids, pixels)
            if reencode:                             # the stored embeddings died with their encoder
                images, reencode = await self.encode(pixels, route), False
            # a retry or migration re-prefills prompt + everything streamed so far: the next token
            # it samples is exactly the one the lost instance would have produced (greedy)
            left = replace(sampling, max_tokens=sampling.max_tokens - len(generated)) if generated else sampling
            try:
                first = await self.stages.prefill.call("prefill", rid, token_ids + generated, left, images,
                                                        None if images is not None else pixels, pin=route.prefill)
            except asyncio.CancelledError:
                # cut while prefilling (deadline, client gone): the call is cancelled, but the prefill
                # may have finished already, its KV held for a ticket nobody will receive — free it
                # now, not when the reaper's transfer timeout passes. A task: we are being cancelled.
                asyncio.ensure_future(self.stages.prefill.call("release", rid, False, "cancelled during prefill",
                                                               pin=route.prefill))
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
                    asyncio.ensure_future(self.stages.prefill.call("release", rid, False, "client left",
                                                                    pin=route.prefill))
                raise
            if first["ticket"] is None:
                return
            try:
                async for item in self._decode(rid, first["ticket"], route):
                    generated += item["tokens"]
                    yield item
                return
            except TransferFailed as e:
                self.transfer_failures += 1
                await self.stages.prefill.call("release", rid, False, str(e), pin=route.prefill)
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

    async def _decode(self, rid: str, ticket, route: Route) -> AsyncIterator[dict]:
        imported = False
        release = lambda *a: self.stages.prefill.call("release", rid, *a, pin=route.prefill)
        try:
            # follow_moves: a decode instance switching role moves the sequence on (services/follow.py)
            async for item in follow_moves(self.stages.decode, rid, ticket, route.decode):
                if "transfer_failed" in item:
                    raise TransferFailed(item["transfer_failed"])
                if item.get("imported"):
                    imported = True
                    await release(True)
                    continue
                yield item
        except TransferFailed:
            raise
        except BaseException:
            if not imported:
                # cancelled, or the decode replica died before importing: prefill must still free.
                # A task, not an await: a cancelled coroutine can't reliably await any more.
                asyncio.ensure_future(release(False, "decode never imported"))
            raise

    async def encode(self, pixels: list, route: Route) -> list:
        groups = chunks_by_encoder(pixels, route, self.max_encoders_per_request)
        results = await asyncio.gather(*(self.stages.encode.call("encode", chunk, pin=pin) for pin, chunk in groups))
        return [emb for chunk in results for emb in chunk]

