"""Image bytes → validated PIL image → the checkpoint's pixel inputs, plus the content hash that keys them.

Life of an image here:
1. ``check_image_count`` refuses a request with too many images before any is opened.
2. ``decode_image`` checks the byte size, then lets PIL read the *header only* (``Image.open`` is
   lazy) to learn the format and the declared width x height. Unsupported formats and images whose
   declared pixel count is over the limit (decompression bombs: a few KB of PNG can declare 64 Mpx)
   are refused before a single pixel is decoded; so are extreme aspect ratios (a 1 x 16000 strip
   passes a pixel cap, but resizing its short side up to the processor's size makes gigapixels).
   Only the allowed formats' parsers ever see the bytes; only then is the image decoded, made RGB.
3. ``ImageProcessor.pixel_inputs`` runs the checkpoint's own image processor on that one image and
   returns the dict ``decoders.model.prepare_prompt`` would have produced for it (LLaVA:
   ``pixel_values`` [1, C, H, W]; Qwen2-VL: ``pixel_values`` [patches, dim] + ``image_grid_thw`` [1, 3]).
4. ``content_hash`` names the future embedding: sha256 of the bytes *and* the preprocessing
   parameters, so the same file under another resize/normalise config is a different cache key.

Every refusal is an ``ImageRejected`` (a ``ValueError``) whose message names the image and the limit;
``services.api_inputs`` turns it into INVALID_ARGUMENT. This module stays free of torch, Ray and RPC
imports so an ingress can validate without loading a model.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# the keys encoders.vision.VisionEncoder reads; anything else a processor returns is not ours to ship
_PIXEL_KEYS = ("pixel_values", "image_grid_thw")


class ImageRejected(ValueError):
    """A client-caused image problem; the message is written for the person who sent it."""


@dataclass(slots=True, frozen=True)
class ImageLimits:
    max_images: int = 8                  # per request
    max_image_bytes: int = 10 * 2**20    # per encoded image
    max_image_pixels: int = 4096 * 4096  # per image, width * height as declared by the header
    max_aspect_ratio: int = 50           # long side / short side
    formats: tuple[str, ...] = ALLOWED_FORMATS

    def __post_init__(self):
        for name in ("max_images", "max_image_bytes", "max_image_pixels", "max_aspect_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be >= 1")
        if not self.formats or any(f not in ALLOWED_FORMATS for f in self.formats):
            raise ValueError(f"ImageLimits.formats must be a non-empty subset of {ALLOWED_FORMATS}")


def check_image_count(n: int, limits: ImageLimits = ImageLimits()) -> None:
    if n > limits.max_images:
        raise ImageRejected(f"{n} images; at most {limits.max_images} per request")


def decode_image(data: bytes, index: int = 0, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Validate and decode one image; refuse bombs from the header, before decoding pixels."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageRejected(f"image {index} must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(f"image {index} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    shown = ", ".join(limits.formats)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and 2x of it; our own limit decides below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # lazy: parses the header only, and only with the allowed formats' parsers
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
            if img.format not in limits.formats:
                raise ImageRejected(f"image {index} has unsupported format {img.format}; allowed: {shown}")
            w, h = img.size
            if w < 1 or h < 1 or w * h > limits.max_image_pixels:
                raise ImageRejected(f"image {index} is {w}x{h} = {w * h} pixels; the limit is "
                                    f"{limits.max_image_pixels}")
            if max(w, h) > limits.max_aspect_ratio * min(w, h):
                raise ImageRejected(f"image {index} is {w}x{h}: aspect ratio over {limits.max_aspect_ratio}:1")
            img.load()
            return img.convert("RGB")
    except ImageRejected:
        raise
    except Image.DecompressionBombError:  # PIL's own ceiling (2x MAX_IMAGE_PIXELS), hit inside open()
        raise ImageRejected(f"image {index} is a decompression bomb (too many pixels)") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected(f"image {index} is not a recognised image file or has an unsupported format "
                            f"(allowed: {shown})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's ways of saying corrupt/truncated
        raise ImageRejected(f"image {index} could not be decoded ({e})") from None
    except Exception:  # noqa: BLE001 — fuzzed bytes reach PIL's parsers' other errors (struct, index...)
        raise ImageRejected(f"image {index} could not be decoded (corrupt or truncated)") from None


def decode_images(images: list[bytes], limits: ImageLimits = ImageLimits()) -> list[Image.Image]:
    check_image_count(len(images), limits)
    return [decode_image(b, i, limits) for i, b in enumerate(images)]


def content_hash(image_bytes: bytes, params: Mapping | str) -> str:
    """sha256 over the preprocessing parameters (canonical JSON) and the raw bytes, hex."""
    canon = params if isinstance(params, str) else _canonical(params)
    h = hashlib.sha256()
    h.update(len(canon).to_bytes(8, "little"))  # length prefix: no params/bytes boundary ambiguity
    h.update(canon.encode())
    h.update(bytes(image_bytes))
    return h.hexdigest()


def _canonical(params: Mapping) -> str:
    # sort_keys + fixed separators: equal configs hash equally whatever their dict order
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


class ImageProcessor:
    """One checkpoint's image preprocessing, one image at a time (the way encoders shard work)."""

    __slots__ = ("image_processor", "family", "params", "_canon")

    def __init__(self, loaded):
        """``loaded``: a ``decoders.model.LoadedModel`` (full or vision_only) of a multimodal family."""
        if loaded.family not in ("llava", "qwen2_vl") or loaded.processor is None:
            raise ValueError(f"{loaded.family!r} checkpoints take no images")
        self.image_processor = loaded.processor.image_processor
        self.family = loaded.family
        # the class joins the config: two backends (PIL / torchvision) of one config differ in pixels
        self.params = dict(self.image_processor.to_dict(), processor_class=type(self.image_processor).__name__)
        self._canon = _canonical(self.params)

    def content_hash(self, image_bytes: bytes) -> str:
        return content_hash(image_bytes, self._canon)

    def pixel_inputs(self, image: Image.Image) -> dict:
        """The per-image dict ``prepare_prompt`` yields for ``image`` (tensors, float32 pixels)."""
        out = self.image_processor(images=[image], return_tensors="pt")
        return {k: out[k] for k in _PIXEL_KEYS if k in out}

    def process(self, images: list[bytes], limits: ImageLimits = ImageLimits()) -> list[tuple[str, dict]]:
        """Validate, decode and preprocess a request's images: [(content_hash, pixel_inputs)], in order."""
        decoded, out = decode_images(images, limits), []
        for i, (raw, img) in enumerate(zip(images, decoded)):
            try:
                out.append((self.content_hash(raw), self.pixel_inputs(img)))
            except ValueError as e:  # the processor refusing an image it cannot patch (e.g. too small)
                raise ImageRejected(f"image {i} was rejected by the model's image processor: {e}") from None
        return out
