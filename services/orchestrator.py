"""Orchestrator: one request's life E → P → D, streamed back as it happens.

    encode   (epd) images split over up to K encode replicas, reassembled in order
    prefill  first token + a KV ticket (pd: the prefill replica encodes the images itself)
    decode   imports the KV, streams the rest; the orchestrator then tells prefill to free
    retry    a failed KV transfer acks FAILED to prefill (blocks freed) and re-prefills on
             another instance, up to `max_retries` times; the client sees one stream

aggregated mode skips all of that: one replica runs the whole request. Stages are reached through
`StageClient`s, so the same code drives Ray Serve handles or in-process servers (tests).
`choose_route` is the single routing decision point; the Redis router replaces it.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

MODES = ("aggregated", "pd", "epd")


class StageClient:
    """Calls a stage's methods: a Ray Serve DeploymentHandle or a plain in-process object."""

    def __init__(self, target, is_handle: bool | None = None):
        self.target = target
        self.is_handle = hasattr(target, "options") if is_handle is None else is_handle

    async def call(self, method: str, *args):
        if self.is_handle:
            return await getattr(self.target, method).remote(*args)
        return await getattr(self.target, method)(*args)

    async def stream(self, method: str, *args) -> AsyncIterator:
        if self.is_handle:
            gen = getattr(self.target.options(stream=True), method).remote(*args)
        else:
            gen = getattr(self.target, method)(*args)
        async for item in gen:
            yield item


@dataclass(slots=True)
class Stages:
    aggregated: StageClient | None = None
    encode: StageClient | None = None
    prefill: StageClient | None = None
    decode: StageClient | None = None


@dataclass(slots=True)
class Route:
    """Where a request goes. Empty fields mean: let Ray Serve's own balancing choose."""
    encoders: list[str] = field(default_factory=list)
    prefill: str | None = None
    decode: str | None = None


class TransferFailed(RuntimeError):
    pass


def choose_route(request_id: str, image_hashes: list[str]) -> Route:
    return Route()


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
        if self.mode == "aggregated":
            async for item in self.stages.aggregated.stream("generate", rid, token_ids, sampling, None, pixels):
                yield item
            return
        images = await self.encode(pixels) if self.mode == "epd" and pixels else None
        first_sent = False
        for attempt in range(self.max_retries + 1):
            first = await self.stages.prefill.call("prefill", rid, token_ids, sampling, images,
                                                    None if images is not None else pixels)
            if not first_sent:
                first_sent = True
                yield {"tokens": first["tokens"], "finish_reason": first["finish_reason"]}
            if first["ticket"] is None:
                return
            try:
                async for item in self._decode(rid, first["ticket"]):
                    yield item
                return
            except TransferFailed as e:
                self.transfer_failures += 1
                await self.stages.prefill.call("release", rid, False, str(e))
                if attempt == self.max_retries:
                    raise

    async def _decode(self, rid: str, ticket) -> AsyncIterator[dict]:
        imported = False
        try:
            async for item in self.stages.decode.stream("decode", rid, ticket):
                if "transfer_failed" in item:
                    raise TransferFailed(item["transfer_failed"])
                if item.get("imported"):
                    imported = True
                    await self.stages.prefill.call("release", rid, True)
                    continue
                yield item
        except TransferFailed:
            raise
        except BaseException:
            if not imported:
                # cancelled, or the decode replica died before importing: prefill must still free.
                # A task, not an await: a cancelled coroutine can't reliably await any more.
                asyncio.ensure_future(self.stages.prefill.call("release", rid, False, "decode never imported"))
            raise

    async def encode(self, pixels: list) -> list:
        chunks = split_evenly(pixels, self.max_encoders_per_request)
        results = await asyncio.gather(*(self.stages.encode.call("encode", chunk) for chunk in chunks))
        return [emb for chunk in results for emb in chunk]

