"""encoders.processor: image validation (bytes, format, header-declared pixels, count), per-image pixel
inputs identical to prepare_prompt's, and the content hash (bytes + preprocessing parameters)."""
import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from decoders.model import prepare_prompt
from encoders.processor import (ImageLimits, ImageProcessor, ImageRejected, check_image_count, content_hash,
                                decode_image, decode_images)


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A 68-byte PNG whose header declares width x height; its pixel data is a stub."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


def test_valid_images_decode_to_rgb(make_image):
    img = decode_image(encoded(Image.new("L", (10, 20))), 0)
    assert img.mode == "RGB" and img.size == (10, 20)
    for fmt in ("JPEG", "WEBP", "GIF", "BMP"):
        assert decode_image(encoded(make_image(1, (12, 9)), fmt), 0).size == (12, 9)


@pytest.mark.parametrize("data, limits, words", [
    (b"garbage", ImageLimits(), "image 0 is not a recognised image file"),
    (b"\x89PNG" + b"0" * 2000, ImageLimits(max_image_bytes=1000), "2004 bytes; the limit is 1000"),
    (encoded(Image.new("RGB", (50, 50)))[:60], ImageLimits(), "could not be decoded"),
    # only the allowed formats' parsers ever read the bytes: others are not even recognised
    (encoded(Image.new("RGB", (4, 4)), "TIFF"), ImageLimits(), "unsupported format"),
    (encoded(Image.new("RGB", (4, 4)), "JPEG"), ImageLimits(formats=("PNG",)), "unsupported format"),
    (encoded(Image.new("RGB", (2, 120))), ImageLimits(), "2x120: aspect ratio over 50:1"),
    (encoded(Image.new("RGB", (101, 100))), ImageLimits(max_image_pixels=100 * 100), "10100 pixels"),
    # crafted headers: refused from the declared size, before any pixel is decoded
    (png_header_only(5000, 5000), ImageLimits(max_image_pixels=10**6), "5000x5000 = 25000000 pixels"),
    (png_header_only(100_000, 100_000), ImageLimits(), "decompression bomb"),  # past PIL's own ceiling
    ("not bytes", ImageLimits(), "must be bytes"),
])
def test_bad_images_are_refused_with_clear_messages(data, limits, words):
    with pytest.raises(ImageRejected, match=words) as e:
        decode_image(data, 0, limits)
    assert isinstance(e.value, ValueError)


def test_header_check_comes_before_decoding():
    # the same stub with a small declared size passes the pixel check and only then fails to decode:
    # so the big ones above were refused from the header, not by a failed decode
    with pytest.raises(ImageRejected, match="could not be decoded"):
        decode_image(png_header_only(20, 20), 0)
    bomb = encoded(Image.new("1", (8_000, 8_000)))  # a real 64 Mpx bomb in a few KB
    assert len(bomb) < 20_000
    with pytest.raises(ImageRejected, match="pixels"):
        decode_image(bomb, 3)


def test_image_count_limit():
    limits = ImageLimits(max_images=2)
    check_image_count(2, limits)
    one = encoded(Image.new("RGB", (4, 4)))
    with pytest.raises(ImageRejected, match="3 images; at most 2 per request"):
        decode_images([one] * 3, limits)
    with pytest.raises(ValueError):
        ImageLimits(max_images=0)
    with pytest.raises(ValueError):
        ImageLimits(formats=("TIFF",))


def test_api_inputs_reuses_the_same_checks():
    from services.api_inputs import Limits
    from services.api_inputs import decode_image as api_decode
    from services.errors import ErrorCode, TrisectError
    with pytest.raises(TrisectError, match="5000x5000") as e:
        api_decode(png_header_only(5000, 5000), 1, Limits(max_image_pixels=10**6))
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and e.value.param == "images"


@pytest.mark.parametrize("preset", ["tiny_llava", "tiny_qwen2_vl"])
def test_pixel_inputs_equal_prepare_prompt(preset, request, make_image):
    loaded = request.getfixturevalue(preset)
    images = [make_image(1, (64, 48)), make_image(2, (100, 70)), make_image(3, (56, 56))]
    expected = prepare_prompt(loaded, "describe", images).pixel_inputs
    proc = ImageProcessor(loaded)
    items = proc.process([encoded(im) for im in images])  # PNG is lossless: same pixels after decode
    assert len(items) == 3
    for (key, got), want in zip(items, expected):
        assert set(got) == set(want) and len(key) == 64
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_content_hash_covers_bytes_and_preprocessing(tiny_llava, tiny_qwen2_vl, make_image):
    a, b = encoded(make_image(1)), encoded(make_image(2))
    proc = ImageProcessor(tiny_llava)
    assert proc.content_hash(a) == content_hash(a, proc.params) == ImageProcessor(tiny_llava).content_hash(a)
    assert proc.content_hash(a) != proc.content_hash(b)
    # same bytes under another resize config: another key; dict order does not matter
    resized = dict(proc.params, size={"shortest_edge": 64})
    assert content_hash(a, resized) != content_hash(a, proc.params)
    assert content_hash(a, dict(reversed(list(proc.params.items())))) == content_hash(a, proc.params)
    assert ImageProcessor(tiny_qwen2_vl).content_hash(a) != proc.content_hash(a)


def test_processor_refuses_text_models(tiny_llava):
    from dataclasses import replace
    with pytest.raises(ValueError, match="take no images"):
        ImageProcessor(replace(tiny_llava, family="text", image_token_id=None, processor=None))
