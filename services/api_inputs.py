"""Turn a validated GenerateRequest into model inputs, enforcing the limits a client can hit.

Life: a Backend calls `prepare(loaded, req, limits, max_model_len)` once per request, off the event
loop. It first runs `check_request` — counts and sizes only, microseconds to milliseconds: output
tokens, image count and bytes, prompt bytes (UTF-8, every text of the request) — so a request far
over a limit is refused before any image is decoded or any text tokenized. Then it decodes images
and runs the processor. Every failure a client can cause becomes TrisectError(INVALID_ARGUMENT)
with a message naming the limit: undecodable or unsupported image, too many images, bytes, pixels,
an extreme aspect ratio (decompression bombs are refused from the header, before any pixel is
decoded; the checks themselves live in encoders.processor), prompt + max_tokens beyond the context.
`parse_data_url` is shared by both ingresses: images arrive as bytes or `data:` URLs, never as paths
or remote URLs. `Limits` is the config's (cluster.config), re-exported here for the backends.
"""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from cluster.config import Limits
from encoders.processor import ImageLimits, ImageRejected
from encoders.processor import decode_image as _decode_image
from encoders.processor import decode_images as _decode_images
from services.api_types import GenerateRequest
from services.errors import invalid

__all__ = ["Limits", "check_request", "decode_image", "decode_images", "parse_data_url", "prepare",
           "sampling_params"]


def parse_data_url(url: str, param: str = "image_url") -> bytes:
    """`data:image/png;base64,....` -> bytes. Anything else (http, file, paths) is refused."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:40] + "..." if isinstance(url, str) and len(url) > 40 else url
        raise invalid(f"images must be sent inline as data: URLs (base64); got {shown!r} — the "
                      "server never fetches URLs or reads server-side paths", param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise invalid("image data URL must look like data:image/<type>;base64,<data>", param)
    if not header.startswith("image/"):
        raise invalid(f"data URL media type must be image/*, got {header[:-7] or 'none'!r}", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image data URL is not valid base64", param) from None


def _image_limits(limits: Limits) -> ImageLimits:
    return ImageLimits(max_images=limits.max_images, max_image_bytes=limits.max_image_bytes,
                       max_image_pixels=limits.max_image_pixels,
                       max_aspect_ratio=limits.max_image_aspect_ratio)


def decode_image(data: bytes, index: int, limits: Limits) -> Image.Image:
    # one implementation of image validation lives in encoders.processor; here it gets its status
    try:
        return _decode_image(data, index, _image_limits(limits))
    except ImageRejected as e:
        raise invalid(str(e), "images") from None


def decode_images(req: GenerateRequest, limits: Limits) -> list[Image.Image]:
    try:
        return _decode_images(list(req.images), _image_limits(limits))
    except ImageRejected as e:
        raise invalid(str(e), "images") from None


def check_request(req: GenerateRequest, limits: Limits) -> None:
    """The limits that need neither decoding nor tokenizing: run before either."""
    if req.max_tokens > limits.max_tokens:
        raise invalid(f"max_tokens is {req.max_tokens}; the limit is {limits.max_tokens}",
                      "max_tokens")
    if len(req.images) > limits.max_images:
        raise invalid(f"{len(req.images)} images; at most {limits.max_images} per request", "images")
    for i, data in enumerate(req.images):
        if len(data) > limits.max_image_bytes:
            raise invalid(f"image {i} is {len(data)} bytes; the limit is {limits.max_image_bytes}",
                          "images")
    field = "messages" if req.messages else "prompt"
    texts = [req.prompt] + [p.text for m in req.messages for p in m.content]
    if sum(map(len, texts)) > limits.max_prompt_bytes:  # a str has at least as many bytes as chars
        raise invalid(f"the prompt is over {limits.max_prompt_bytes} bytes (max_prompt_bytes); it "
                      "was refused before tokenizing", field)
    size = 0
    for text in texts:
        try:
            size += len(text.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates, e.g. JSON "\ud800": no tokenizer takes them
            raise invalid("the text is not valid Unicode (it holds a lone surrogate)", field) from None
    if size > limits.max_prompt_bytes:
        raise invalid(f"the prompt is {size} bytes (UTF-8); the limit is {limits.max_prompt_bytes} "
                      "(max_prompt_bytes)", field)


def check_lengths(req: GenerateRequest, prompt_tokens: int, limits: Limits,
                  max_model_len: int) -> None:
    if prompt_tokens + req.max_tokens > max_model_len:
        raise invalid(f"prompt ({prompt_tokens} tokens, images included) + max_tokens "
                      f"({req.max_tokens}) exceeds the context length {max_model_len}",
                      "messages")


def prepare(loaded, req: GenerateRequest, limits: Limits, max_model_len: int):
    """-> decoders.model.PreparedPrompt (token ids with placeholders expanded, pixels per image)."""
    from decoders.model import PreparedPrompt, prepare_prompt

    check_request(req, limits)
    if req.images and loaded.family == "text":
        raise invalid("this model is text-only: images are not accepted", "images")
    images = decode_images(req, limits)
    chat = req.chat()
    single = (len(chat) == 1 and chat[0].role == "user"
              and [p.type for p in chat[0].content] == ["image"] * len(images) + ["text"])
    try:
        if single:  # the canonical layout: exactly what decoders.model.prepare_prompt builds
            prepared = prepare_prompt(loaded, chat[0].text, images)
        else:
            prepared = PreparedPrompt(*_prepare_chat(loaded, chat, images))
    except ValueError as e:  # the processor refusing an image (e.g. too small to patch)
        raise invalid(f"the model's processor rejected the input: {e}", "messages") from None
    check_lengths(req, len(prepared.token_ids), limits, max_model_len)
    return prepared


def _prepare_chat(loaded, chat, images):
    """Multi-turn or interleaved content: render the checkpoint's chat template ourselves."""
    import torch

    messages = [{"role": m.role,
                 "content": [{"type": "image"} if p.type == "image" else
                             {"type": "text", "text": p.text} for p in m.content]}
                for m in chat]
    if loaded.family == "text":
        ids = loaded.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.text} for m in chat], add_generation_prompt=True,
            tokenize=True, return_dict=False)
        return [int(t) for t in ids], []
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    enc = loaded.processor(text=[text], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    if not images:
        return ids, []
    if loaded.family == "llava":
        return ids, [{"pixel_values": enc["pixel_values"][i:i + 1]} for i in range(len(images))]
    grid = enc["image_grid_thw"]  # qwen2_vl: pixel rows are patches, image after image
    chunks = torch.split(enc["pixel_values"], grid.prod(-1).tolist())
    return ids, [{"pixel_values": c.clone(), "image_grid_thw": grid[i:i + 1].clone()}
                 for i, c in enumerate(chunks)]


def sampling_params(req: GenerateRequest):
    """The engine's SamplingParams for an API request (validated there too)."""
    from decoders.sampling import SamplingParams
    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos)
