"""Seeded serving workloads for `trisect bench serve`: what each request asks, and when it arrives.

Life: `build_trace(mix, n, seed, tokenizer)` draws n requests from a named mix (or `load_jsonl` reads
them from a file): each is random text of a drawn token length, a drawn number of random RGB images
(PNG bytes, deterministic per seed) and a drawn output length. `arrival_offsets(n, rate, burstiness,
seed)` then says when each is sent, in seconds from the start of a swept point: gamma-distributed gaps
of mean 1/rate (burstiness 1 = Poisson; < 1 burstier; rate inf = all at once), as vLLM's bench does.
The same seed gives the same requests and the same arrivals on every server, so runs compare.

Random text is made like vLLM's `--dataset-name random`: random non-special token ids of the
checkpoint's tokenizer, decoded, re-encoded and trimmed or topped up until it is the asked length.
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True, frozen=True)
class Component:
    """One kind of request in a mix. Lengths are drawn uniformly in [len·(1-r), len·(1+r)]."""
    weight: float
    prompt_len: int                    # tokens of random text (the chat template adds a few)
    output_len: int
    images: tuple[int, int] = (0, 0)   # images per request, drawn uniformly in [lo, hi]
    range_ratio: float = 0.0

    def __post_init__(self):
        if self.weight <= 0 or self.prompt_len < 1 or self.output_len < 1:
            raise ValueError("weight, prompt_len and output_len must be positive")
        if not 0 <= self.images[0] <= self.images[1]:
            raise ValueError(f"images must be (lo, hi) with 0 <= lo <= hi, got {self.images}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("range_ratio must be in [0, 1)")


# `text-long` and `mixed` stay under 1024 tokens in all, the context the vLLM peer is served with
MIXES: dict[str, tuple[Component, ...]] = {
    "random-text": (Component(1, 256, 64),),                       # vLLM's random 256 in / 64 out
    "image-heavy": (Component(1, 32, 32, images=(2, 6)),),
    "text-long": (Component(1, 640, 128, range_ratio=0.25),),
    "mixed": (Component(0.6, 256, 64, range_ratio=0.5), Component(0.3, 64, 64, images=(1, 2)),
              Component(0.1, 640, 128, range_ratio=0.25)),
}


@dataclass(slots=True, frozen=True)
class TraceRequest:
    index: int
    prompt: str
    output_len: int
    images: tuple[bytes, ...] = ()     # PNG files

    def __post_init__(self):
        if not self.prompt or self.output_len < 1:
            raise ValueError(f"request {self.index}: needs a prompt and output_len >= 1")


def random_image_png(seed: int, size: tuple[int, int]) -> bytes:
    from PIL import Image
    w, h = size
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def random_text(tokenizer, n_tokens: int, rng: np.random.Generator) -> str:
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    ids = list(rng.choice(vocab, n_tokens))
    for _ in range(10):                     # decode → encode rarely round-trips exactly; converge
        text = tokenizer.decode(ids)
        got = tokenizer.encode(text, add_special_tokens=False)
        if len(got) == n_tokens:
            break
        ids = got[:n_tokens] if len(got) > n_tokens else got + list(rng.choice(vocab, n_tokens - len(got)))
    return text


def _draw(rng: random.Random, n: int, ratio: float) -> int:
    return max(1, rng.randint(math.floor(n * (1 - ratio)), math.ceil(n * (1 + ratio))))


def build_trace(mix: tuple[Component, ...], n: int, seed: int, tokenizer,
                image_size: tuple[int, int] = (64, 64)) -> list[TraceRequest]:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = rng.choices(mix, weights=[c.weight for c in mix])[0]
        n_img = rng.randint(*c.images)
        out.append(TraceRequest(i, random_text(tokenizer, _draw(rng, c.prompt_len, c.range_ratio), nrng),
                                _draw(rng, c.output_len, c.range_ratio),
                                tuple(random_image_png(seed * 1_000_003 + i * 64 + k, image_size) for k in range(n_img))))
    return out


def load_jsonl(path: str, seed: int, tokenizer=None, image_size: tuple[int, int] = (64, 64)) -> list[TraceRequest]:
    """One request per line: {"prompt": str} or {"prompt_len": int} (random text), "output_len"
    (default 64), "images" (a number of random images, default 0)."""
    nrng = np.random.default_rng(seed)
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            i = len(out)
            d = json.loads(line)
            prompt = d.get("prompt") or random_text(tokenizer, int(d["prompt_len"]), nrng)
            out.append(TraceRequest(i, prompt, int(d.get("output_len", 64)),
                                    tuple(random_image_png(seed * 1_000_003 + i * 64 + k, image_size)
                                          for k in range(int(d.get("images", 0))))))
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of n requests at `rate` req/s; gaps are gamma(k=burstiness,
    mean 1/rate), so burstiness 1 is a Poisson process; the first request goes at 0."""
    if not rate > 0 or not burstiness > 0:
        raise ValueError("rate and burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng([seed, round(rate * 1000)])   # same arrivals for a rate on every server
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()
