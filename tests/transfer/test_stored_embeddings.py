"""Image embeddings past the inline limit travel through a real Ray object store and come back whole."""
import asyncio

import pytest
import torch

from encoders.stored import StoredEmbeddings, maybe_store, resolve
from encoders.vision import ImageEmbedding


def embeddings():
    gen = torch.Generator().manual_seed(3)
    return [ImageEmbedding(torch.randn(16, 64, generator=gen), content_hash="a"),
            ImageEmbedding(torch.randn(4, 64, generator=gen), grid_thw=(1, 4, 4), content_hash="b")]


def test_without_ray_everything_stays_inline():
    embeds = embeddings()
    assert maybe_store(embeds, inline_limit_bytes=0) is embeds


def test_past_the_limit_embeddings_go_through_the_store_and_resolve_in_order(ray_local):
    embeds = embeddings()
    assert maybe_store(embeds, inline_limit_bytes=20 * 64 * 4) is embeds        # exactly at the limit
    sent = maybe_store(embeds, inline_limit_bytes=20 * 64 * 4 - 1)
    assert len(sent) == 1 and isinstance(sent[0], StoredEmbeddings) and sent[0].count == 2
    extra = ImageEmbedding(torch.ones(2, 64), content_hash="c")                   # an inline one after it
    got = asyncio.run(resolve(sent + [extra]))
    assert [e.content_hash for e in got] == ["a", "b", "c"]
    assert got[1].grid_thw == (1, 4, 4)
    for a, b in zip(got, embeds + [extra]):
        assert torch.equal(a.embeds, b.embeds)


def test_a_stored_result_that_does_not_match_its_count_is_refused(ray_local):
    bad = StoredEmbeddings(ray_local.put(embeddings()), count=3)
    with pytest.raises(ValueError, match="expected 3"):
        asyncio.run(resolve([bad]))
