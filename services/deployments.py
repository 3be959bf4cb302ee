"""The stage replicas: EncodeServer, and LLMServer — one engine class for prefill, decode and
aggregated, parameterised by role. app.py wraps them in `serve.deployment` with per-pool
resources and autoscaling; here they are plain classes so they can also run in-process.

LLMServer's life per request, by role:
  aggregated  `generate` → encode images (if pixels given) → engine streams every token
  prefill     `prefill`  → encode (pd mode) or take embeddings (epd) → first token → KV into a
              sender, blocks held → returns the ticket; `release(ok)` once the decode side has
              it (or failed) frees the blocks; a reaper frees them if no verdict ever comes
  decode      `decode`   → receiver polled (never blocking the engine) → import_kv → "imported" (only
              now may the source free: shm/objectstore payloads are views of its memory) → tokens;
              a failed transfer is reported in-band so the orchestrator re-prefills
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import torch

from encoders.stored import DEFAULT_INLINE_LIMIT_BYTES, maybe_store, resolve
from services import request_log, stage_metrics

log = logging.getLogger(__name__)
_REAP_INTERVAL_S = 1.0


def _replica_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:                              # outside a Serve replica (tests, in-process)
        return f"local-{os.getpid()}"


def _assigned_resources() -> dict:
    import ray
    if not ray.is_initialized():                   # in-process use: don't start a Ray just to ask
        return {}
    return dict(ray.get_runtime_context().get_assigned_resources())


def _set_threads(threads: int | None) -> None:
    # Ray sets OMP_NUM_THREADS=1 in workers; torch would then run single-threaded
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


class EncodeServer:
    def __init__(self, model: str, cache_bytes: int = 256 * 2**20, threads: int | None = None,
                 cache_dir: str | None = None, redis_url: str | None = None,
                 inline_limit_bytes: int = DEFAULT_INLINE_LIMIT_BYTES):
        from cluster.registry import Load
        from encoders.worker import EncoderWorker
        from services.presence import maybe_presence
        _set_threads(threads)
        self.worker = EncoderWorker(model, cache_bytes=cache_bytes, cache_dir=cache_dir)
        self.inline_limit_bytes = inline_limit_bytes   # bigger results go E→P via the object store
        self.stored_results = 0
        self.instance_id = _replica_id()
        self.queued = 0
        self.advertised: set[str] = set()        # image hashes the router was told we hold
        self.presence = maybe_presence(redis_url, self.instance_id, "encode", "encode_pool", 8,
                                       lambda: Load(encode_queue=self.queued))
        request_log.setup()
        self.metrics = stage_metrics.watch_encoder(self)

    async def encode(self, items: list) -> list:
        """items: [(content_hash, pixel_inputs)] → ImageEmbedding per item, in order (or, past
        `inline_limit_bytes`, one StoredEmbeddings holding them all: see encoders/stored.py)."""
        self.queued += len(items)
        try:
            with stage_metrics.Stopwatch() as took:
                out = await asyncio.to_thread(self.worker.encode, items)
            stage_metrics.encoded("encode", len(items), took.seconds)
        finally:
            self.queued -= len(items)
        if self.presence:
            self._advertise([h for h, _ in items if h])
        sent = maybe_store(out, self.inline_limit_bytes)
        self.stored_results += sent is not out
        return sent

    def _advertise(self, encoded: list[str]) -> None:
        """Tell the router what this cache holds now: these images, minus whatever the LRU evicted."""
        self.advertised.update(encoded)
        evicted = [h for h in self.advertised if h not in self.worker.cache]
        self.advertised.difference_update(evicted)
        self.presence.publish("mm", encoded)
        self.presence.unpublish("mm", evicted)

    def stats(self) -> dict:
        return {"instance_id": self.instance_id, "role": "encode", "parameters": self.worker.num_parameters(),
                "resources": _assigned_resources(), "stored_results": self.stored_results, **self.worker.stats()}


class LLMServer:
    def __init__(self, model: str, role: str, engine: dict | None = None, transfer: str = "objectstore",
                 threads: int | None = None, cache_dir: str | None = None, redis_url: str | None = None,
                 prefault_object_store: bool = False, transfer_timeout_s: float = 30.0):
        from decoders.config import EngineConfig
        from decoders.engine import Engine
        from decoders.kv_transfer import backend
        from decoders.model import load_model
        from services.engine_loop import EngineLoop
        _set_threads(threads)
        self.role = role
        self.loaded = load_model(model, cache_dir=cache_dir)
        self.engine = Engine(self.loaded, EngineConfig(**(engine or {}), role=role))
        self.loop = EngineLoop(self.engine)
        self.vision = None
        if self.loaded.family != "text":
            from encoders.vision import VisionEncoder
            self.vision = VisionEncoder(self.loaded)
        self.sender_cls, self.receiver_cls = backend(transfer)
        if transfer == "objectstore" and role != "aggregated" and prefault_object_store:
            from decoders.kv_transfer.objectstore import prefault_plasma
            prefault_plasma()                      # now, so no request's KV put pays the page faults
        self.senders: dict = {}
        # releases that came before their prefill ended (the caller was cut while prefilling): rid ->
        # when; the prefill frees at once when it ends, instead of leaving its KV to the reaper
        self.early_releases: dict[str, float] = {}
        # a transfer nobody acks within this is over: the reaper frees its blocks (orchestrator gone)
        self.transfer_timeout_s = transfer_timeout_s
        self.imports = 0                           # KV handovers this decode instance took in
        self.instance_id = _replica_id()
        self._reaper: asyncio.Task | None = None
        from services.presence import maybe_presence
        pool = "decode_pool" if role == "decode" else "prefill_pool"
        self.presence = maybe_presence(redis_url, self.instance_id, role, pool, self.engine.config.max_num_seqs,
                                       self._load)
        request_log.setup()
        self.transfer = transfer
        # the role is read at each sample: a role-switching replica's changes (services/switchable.py)
        self.metrics = stage_metrics.watch_engine(self.engine, lambda: self.role, self.instance_id)
        if role != "aggregated":                   # any of these may take KV in (now or after a switch)
            stage_metrics.transferred(transfer, None)

    def _load(self):
        """Read from the presence thread without the engine lock: a slightly stale figure is fine."""
        from cluster.registry import Load
        e, bm = self.engine, self.engine.block_manager
        return Load(waiting=len(e.scheduler.waiting), running=len(e.scheduler.running),
                    free_kv_blocks=bm.num_free_blocks, total_kv_blocks=bm.num_usable_blocks)

    async def _images(self, images, pixels) -> list:
        if images is not None:
            return await resolve(images)
        if not pixels:
            return []
        with stage_metrics.Stopwatch() as took:
            embeds = await asyncio.to_thread(self.vision.encode, [p for _, p in pixels])
        stage_metrics.encoded(self.role, len(pixels), took.seconds)
        for emb, (content_hash, _) in zip(embeds, pixels):
            emb.content_hash = content_hash
        return embeds

    def _start(self, rid, token_ids, sampling, images):
        return lambda e: e.add_request(rid, token_ids, sampling, images=images)

    async def generate(self, rid: str, token_ids: list[int], sampling, images=None, pixels=None):
        imgs = await self._images(images, pixels)
        async for out in self.loop.stream(rid, self._start(rid, token_ids, sampling, imgs)):
            if out.finished and self.presence:
                self.presence.publish("px", [h.hex() for h in out.block_hashes])
            yield {"tokens": out.new_token_ids, "finish_reason": out.finish_reason}

    async def prefill(self, rid: str, token_ids: list[int], sampling, images=None, pixels=None) -> dict:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        imgs = await self._images(images, pixels)
        async for out in self.loop.stream(rid, self._start(rid, token_ids, sampling, imgs)):
            if out.kv is None:                       # finished at its first token: nothing to hand over
                return {"tokens": out.new_token_ids, "finish_reason": out.finish_reason, "ticket": None}
            if self.early_releases.pop(rid, None) is not None:
                await self.loop.run(lambda e: e.release(rid))   # nobody will take this KV
                return {"tokens": out.new_token_ids, "finish_reason": "abort", "ticket": None}
            sender = self.sender_cls(out.kv, timeout_s=self.transfer_timeout_s)
            self.senders[rid] = sender
            if self.presence:                    # the prompt's blocks stay cached here: prefix affinity
                self.presence.publish("px", [h.hex() for h in out.block_hashes])
            return {"tokens": out.new_token_ids, "finish_reason": None, "ticket": sender.start(),
                    "prefill_instance": self.instance_id}
        raise RuntimeError(f"prefill of {rid} produced no output")

    async def release(self, rid: str, ok: bool, reason: str = "") -> None:
        sender = self.senders.pop(rid, None)
        if sender is not None:
            sender.ack(ok, reason or "decode side failed")
        elif not ok:
            self.early_releases[rid] = time.monotonic()
        # abort: a prefill still running stops here; a handed-over sequence's blocks are freed
        await self.loop.run(lambda e: e.abort(rid))

    async def _reap(self) -> None:
        """Free blocks of transfers nobody will ever ack (orchestrator died): the sender timed out."""
        while True:
            await asyncio.sleep(_REAP_INTERVAL_S)
            stale = time.monotonic() - self.transfer_timeout_s
            for rid in [r for r, t in self.early_releases.items() if t < stale]:
                del self.early_releases[rid]      # its prefill had already ended, or never came
            for rid, sender in list(self.senders.items()):
                try:
                    if sender.poll().done:
                        log.warning("KV transfer of %s ended %s (%s); freeing its blocks", rid,
                                    sender.state.value, sender.error)
                        await self.release(rid, sender.state.value == "success")
                except Exception:                # one bad transfer must not stop the reaping of others
                    log.exception("reaping the KV transfer of %s failed", rid)

    async def receive(self, ticket):
        """The KV a ticket names, once its transfer is over (recorded in the transfer metrics):
        (payload, None), or (None, why it failed)."""
        rx = self.receiver_cls(ticket)
        with stage_metrics.Stopwatch() as took:
            while not rx.poll().done:
                await asyncio.sleep(0.0005)
        ok = rx.state.value == "success"
        stage_metrics.transferred(self.transfer, ok, rx.payload().nbytes if ok else 0, took.seconds)
        return (rx.payload(), None) if ok else (None, rx.error or "transfer failed")

    async def decode(self, rid: str, ticket):
        payload, failed = await self.receive(ticket)
        if failed:
            yield {"transfer_failed": failed}
            return
        imported = False
        async for out in self.loop.stream(rid, lambda e: e.import_kv(payload)):
            if not imported:                     # the engine has copied the KV: the source may free it
                imported = True
                self.imports += 1
                yield {"imported": True, "decode_instance": self.instance_id}
            yield {"tokens": out.new_token_ids, "finish_reason": out.finish_reason}

    async def stats(self) -> dict:
        def read(e):
            bm = e.block_manager
            return {"free_blocks": bm.num_free_blocks, "total_blocks": bm.num_usable_blocks,
                    "waiting": len(e.scheduler.waiting), "running": len(e.scheduler.running),
                    "handovers": len(e.handovers), "prefix_hits": bm.prefix_hits}
        return {"instance_id": self.instance_id, "role": self.role, "senders": len(self.senders),
                "imports": self.imports, "resources": _assigned_resources(), "time": time.time(),
                **(await self.loop.run(read))}
