"""encoders.cache.EmbeddingCache: LRU bounded by tensor bytes, counters, thread safety."""
import threading

import pytest
import torch

from encoders.cache import EmbeddingCache, embedding_bytes
from encoders.vision import ImageEmbedding


def emb(rows: int, fill: float = 0.0, dtype=torch.float32) -> ImageEmbedding:
    return ImageEmbedding(embeds=torch.full((rows, 4), fill, dtype=dtype))


def test_bytes_are_numel_times_element_size():
    assert embedding_bytes(emb(3)) == 3 * 4 * 4
    assert embedding_bytes(emb(3, dtype=torch.bfloat16)) == 3 * 4 * 2


def test_lru_by_bytes_and_counters():
    cache = EmbeddingCache(capacity_bytes=3 * 64)  # three 4-row float32 embeddings (64 B each)
    for key in "abc":
        assert cache.put(key, emb(4))
    assert cache.bytes == 192 and len(cache) == 3
    assert cache.get("a") is not None              # a becomes most recent: b is now the oldest
    assert cache.get("zz") is None
    assert cache.put("d", emb(4))                  # evicts b
    assert cache.keys() == ["c", "a", "d"] and "b" not in cache
    assert cache.put("e", emb(8))                  # 128 B: evicts c and a
    assert cache.keys() == ["d", "e"] and cache.bytes == 192
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.entries, s.bytes, s.capacity_bytes) == (1, 1, 3, 2, 192, 192)


def test_oversized_refresh_and_zero_capacity():
    cache = EmbeddingCache(capacity_bytes=100)
    assert not cache.put("big", emb(10)) and len(cache) == 0 and cache.stats().rejected == 1
    assert cache.put("k", emb(1, 1.0)) and cache.put("k", emb(1, 2.0))  # refresh: replaced, not doubled
    assert cache.bytes == 16 and cache.get("k").embeds[0, 0] == 2.0
    off = EmbeddingCache(0)
    assert not off.put("k", emb(1)) and off.get("k") is None and off.stats().misses == 1
    with pytest.raises(ValueError):
        EmbeddingCache(-1)
    with pytest.raises(ValueError):
        cache.put("", emb(1))


def test_returned_embeddings_share_tensors_but_not_labels():
    cache = EmbeddingCache(1000)
    original = emb(2, 5.0)
    cache.put("h", original)
    got = cache.get("h")
    assert got.content_hash == "h" and got.embeds is original.embeds  # no copy of the tensor
    got.content_hash = "relabelled"
    assert cache.get("h").content_hash == "h"


def test_concurrent_use_keeps_accounting_exact():
    cache = EmbeddingCache(capacity_bytes=20 * 64)

    def work(t: int):
        for i in range(300):
            key = f"{(t * 7 + i) % 40}"
            if cache.get(key) is None:
                cache.put(key, emb(4))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = cache.stats()
    assert s.hits + s.misses == 6 * 300
    assert s.bytes == 64 * len(cache) <= 20 * 64 and s.entries == len(cache.keys())
