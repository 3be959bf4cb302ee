"""EncoderWorker: what one encode-only replica is, minus Ray — vision tower, processor, embedding cache.

Life of a worker: built once per replica from a checkpoint path or preset name. It loads the model
``vision_only`` (the language model is never materialised: see ``decoders.model.load_model``), so its
memory is the vision tower + projector, the processor, and the cache budget. Then, per request:
1. (optional) ``process(images)`` validates and preprocesses raw bytes into
   ``[(content_hash, pixel_inputs)]`` — the ingress may do this instead and send pixels.
2. ``encode(items)`` looks every hash up in the ``EmbeddingCache``; the misses (deduplicated, so an
   image repeated within a request is encoded once) go through the vision tower in one
   ``VisionEncoder.encode`` batch; their embeddings are cached and everything is returned in order,
   each labelled with its content hash.
``stats()`` counts vision-tower batches (``forwards``), images actually encoded and the cache's
counters, so tests and the registry can see a hit skipped the forward.
The Ray Serve ``EncodeServer`` deployment wraps one of these; nothing here knows about Ray.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from decoders.model import load_model
from encoders.cache import EmbeddingCache
from encoders.processor import ImageLimits, ImageProcessor
from encoders.vision import ImageEmbedding, VisionEncoder

DEFAULT_CACHE_BYTES = 256 * 2**20


class EncoderWorker:
    def __init__(self, model_name_or_path: str, cache_bytes: int = DEFAULT_CACHE_BYTES, cache_dir=None,
                 dtype: torch.dtype = torch.float32, num_threads: int | None = None):
        if num_threads is not None:  # Ray sets OMP threads to 1 inside replicas; the caller decides
            torch.set_num_threads(num_threads)
        self.loaded = load_model(model_name_or_path, cache_dir=cache_dir, dtype=dtype, vision_only=True)
        self.encoder = VisionEncoder(self.loaded)
        self.processor = ImageProcessor(self.loaded)
        self.cache = EmbeddingCache(cache_bytes)
        self._lock = threading.Lock()  # guards the counters only; forwards may run concurrently
        self._forwards = 0
        self._images_encoded = 0

    @property
    def family(self) -> str:
        return self.loaded.family

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.loaded.model.parameters())

    def process(self, images: Sequence[bytes], limits: ImageLimits = ImageLimits()) -> list[tuple[str, dict]]:
        return self.processor.process(list(images), limits)

    def encode(self, items: Sequence[tuple[str, dict]]) -> list[ImageEmbedding]:
        """``items``: (content_hash, pixel_inputs) per image → one embedding per image, in order."""
        out: list[ImageEmbedding | None] = [None] * len(items)
        todo: dict[str, list[int]] = {}  # hash → positions still needing it, in first-seen order
        for i, (key, pixels) in enumerate(items):
            if not key:
                raise ValueError(f"item {i} has no content hash")
            if key in todo:  # repeated within this request: one lookup, one forward at most
                todo[key].append(i)
            elif (hit := self.cache.get(key)) is not None:
                out[i] = hit
            else:
                todo[key] = [i]
        if todo:
            keys = list(todo)
            fresh = self.encoder.encode([items[todo[k][0]][1] for k in keys])
            with self._lock:
                self._forwards += 1
                self._images_encoded += len(keys)
            for key, emb in zip(keys, fresh):
                emb.content_hash = key
                self.cache.put(key, emb)
                for pos in todo[key]:  # a fresh wrapper each: callers may relabel theirs
                    out[pos] = ImageEmbedding(embeds=emb.embeds, grid_thw=emb.grid_thw, content_hash=key)
        return out  # type: ignore[return-value]  # every slot is filled above

    def encode_images(self, images: Sequence[bytes], limits: ImageLimits = ImageLimits()) -> list[ImageEmbedding]:
        """Raw bytes in, embeddings out: validation, preprocessing, cache and forward in one call."""
        return self.encode(self.process(images, limits))

    def stats(self) -> dict:
        c = self.cache.stats()
        with self._lock:
            forwards, encoded = self._forwards, self._images_encoded
        return {"forwards": forwards, "images_encoded": encoded, "cache_hits": c.hits,
                "cache_misses": c.misses, "cache_evictions": c.evictions, "cache_entries": c.entries,
                "cache_bytes": c.bytes, "cache_capacity_bytes": c.capacity_bytes}
