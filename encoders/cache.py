"""EmbeddingCache: content hash → ImageEmbedding, least-recently-used first out, bounded by bytes.

Life of an entry: an encoder replica computes an image's embedding and ``put``s it under the
image's content hash (``encoders.processor.content_hash``: bytes + preprocessing parameters). A later
request carrying the same image ``get``s it back without running the vision tower; every ``get``
moves the entry to the most-recent end. When the stored tensors' bytes (``embeds.numel() *
element_size()``) would exceed the budget, the least recently used entries are evicted until the new
one fits. An embedding larger than the whole budget is not stored at all (it would evict everything
and still not fit).

Counters (hits, misses, evictions, bytes, entries) feed the replica's stats and the router's cache
index. One lock guards everything: a Ray Serve replica may call in from several threads.
Stored tensors are shared, never copied: callers get a fresh ``ImageEmbedding`` around the same
tensor, so they may set its fields freely but must not write into ``embeds`` in place.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from encoders.vision import ImageEmbedding


def embedding_bytes(e: ImageEmbedding) -> int:
    return e.embeds.numel() * e.embeds.element_size()


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0   # puts larger than the whole budget
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class EmbeddingCache:
    __slots__ = ("capacity_bytes", "_entries", "_bytes", "_lock", "_stats")

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)  # 0 disables caching but keeps the counters honest
        self._entries: OrderedDict[str, ImageEmbedding] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = CacheStats(capacity_bytes=self.capacity_bytes)

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return _view(e, key)

    def put(self, key: str, embedding: ImageEmbedding) -> bool:
        """Store (or refresh) ``key``; False when the embedding alone exceeds the budget."""
        if not key:
            raise ValueError("cache keys must be non-empty content hashes")
        size = embedding_bytes(embedding)
        with self._lock:
            if (old := self._entries.pop(key, None)) is not None:
                self._bytes -= embedding_bytes(old)
            if size > self.capacity_bytes:
                self._stats.rejected += 1
                self._sync()
                return False
            while self._bytes + size > self.capacity_bytes:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= embedding_bytes(victim)
                self._stats.evictions += 1
            self._entries[key] = _view(embedding, key)
            self._bytes += size
            self._sync()
            return True

    def __contains__(self, key: str) -> bool:  # a peek: no counter, no recency change
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        """Cached hashes, least recently used first (what a registry advertises)."""
        with self._lock:
            return list(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._stats.as_dict())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._sync()

    def _sync(self) -> None:
        self._stats.entries, self._stats.bytes = len(self._entries), self._bytes


def _view(e: ImageEmbedding, key: str) -> ImageEmbedding:
    # a new wrapper around the same tensor: callers may relabel theirs without touching the cache's
    return ImageEmbedding(embeds=e.embeds, grid_thw=e.grid_thw, content_hash=key)
