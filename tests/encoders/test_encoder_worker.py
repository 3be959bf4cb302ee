"""encoders.worker.EncoderWorker: vision-only weights, embeddings equal the full model's, cache hits
skip the forward, and a request's images sharded over two workers come back in order."""
import io

import pytest
import torch

from decoders.model import _VISION_PARTS, prepare_prompt
from encoders.processor import ImageRejected
from encoders.shard import estimate_cost, plan_shards, reassemble, split
from encoders.vision import VisionEncoder
from encoders.worker import EncoderWorker

PRESETS = {"tiny-llava": "tiny_llava", "tiny-qwen2-vl": "tiny_qwen2_vl"}


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=list(PRESETS))
def pair(request, trisect_cache):
    """(encode-only worker, the full LoadedModel of the same checkpoint)."""
    full = request.getfixturevalue(PRESETS[request.param])
    return EncoderWorker(request.param, cache_bytes=2**20, cache_dir=trisect_cache), full


def test_holds_no_language_model_parameters(pair):
    worker, full = pair
    names = [n for n, _ in worker.loaded.model.named_parameters()]
    assert names and not any("language_model" in n or n.startswith("lm_head") for n in names)
    vision = sum(p.numel() for part in _VISION_PARTS[full.family]
                 for p in getattr(full.model.model, part).parameters())
    total = sum(p.numel() for p in full.model.parameters())
    assert worker.num_parameters() == vision
    assert worker.num_parameters() < 0.2 * total


def test_embeddings_equal_vision_encoder_on_the_full_model(pair, make_image):
    worker, full = pair
    images = [make_image(11, (64, 48)), make_image(12, (90, 60))]
    want = VisionEncoder(full).encode(prepare_prompt(full, "x", images).pixel_inputs)
    got = worker.encode_images([png(im) for im in images])
    assert len(got) == 2
    for g, w in zip(got, want):
        assert torch.equal(g.embeds, w.embeds) and g.grid_thw == w.grid_thw and len(g.content_hash) == 64


def test_second_identical_image_is_a_cache_hit_without_a_forward(pair, make_image):
    worker, _ = pair
    data = png(make_image(21))
    before = worker.stats()
    first = worker.encode_images([data])
    mid = worker.stats()
    second = worker.encode_images([data])
    after = worker.stats()
    assert mid["forwards"] == before["forwards"] + 1 and mid["cache_misses"] == before["cache_misses"] + 1
    assert after["forwards"] == mid["forwards"] and after["images_encoded"] == mid["images_encoded"]
    assert after["cache_hits"] == mid["cache_hits"] + 1
    assert torch.equal(first[0].embeds, second[0].embeds) and first[0].content_hash == second[0].content_hash
    assert after["cache_bytes"] >= first[0].embeds.numel() * first[0].embeds.element_size()


def test_repeats_within_a_request_encode_once(pair, make_image):
    worker, _ = pair
    a, b = png(make_image(31)), png(make_image(32))
    before = worker.stats()
    out = worker.encode_images([a, b, a])
    after = worker.stats()
    assert after["forwards"] - before["forwards"] == 1
    assert after["images_encoded"] - before["images_encoded"] == 2
    assert torch.equal(out[0].embeds, out[2].embeds) and not torch.equal(out[0].embeds, out[1].embeds)
    assert [e.content_hash for e in out] == [e.content_hash for e in worker.encode_images([a, b, a])]


def test_invalid_input_is_refused_before_any_forward(pair):
    worker, _ = pair
    before = worker.stats()["forwards"]
    with pytest.raises(ImageRejected, match="not a recognised"):
        worker.encode_images([b"not an image"])
    with pytest.raises(ValueError, match="no content hash"):
        worker.encode([("", {})])
    assert worker.stats()["forwards"] == before


def test_three_images_split_over_two_workers_come_back_in_order(pair, trisect_cache, make_image):
    worker, full = pair
    other = EncoderWorker(str(full.path), cache_bytes=2**20)  # a second replica, cold cache
    images = [make_image(41 + i, (56 + 16 * i, 56)) for i in range(3)]
    items = worker.process([png(im) for im in images])
    ranges = plan_shards([estimate_cost(p) for _, p in items], 2)
    assert len(ranges) == 2
    parts = [w.encode(chunk) for w, chunk in zip((worker, other), split(items, ranges))]
    got = reassemble(parts, ranges)
    want = VisionEncoder(full).encode(prepare_prompt(full, "x", images).pixel_inputs)
    assert [e.content_hash for e in got] == [h for h, _ in items]
    # Qwen2-VL packs a batch's patch rows into one matmul: another split moves the last bits (~1e-5 of ~20)
    for g, w in zip(got, want):
        assert g.embeds.shape == w.embeds.shape and torch.allclose(g.embeds, w.embeds, rtol=1e-5, atol=1e-4)
