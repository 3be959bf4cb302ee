"""Sampling: turn one row of logits into one token, per request.

Greedy below `MIN_TEMPERATURE` (the token-exactness oracle compares this path with HF `generate()`),
otherwise temperature → top-k → top-p → multinomial with the request's own `torch.Generator`, so a
seeded request reproduces whatever else shares its batch.

Each row is sampled on its own and can fail on its own: a temperature the API accepts can still be
too small to divide by (1e-45 turns every logit into ±inf and softmax into NaN), so anything below
`MIN_TEMPERATURE` is greedy — the limit of sampling as temperature → 0 — and a row whose
distribution still comes out non-finite or empty raises `SamplingError` (a ValueError: the
request's parameters, not the engine, are at fault) for the engine to fail that request alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this a temperature is greedy: logits / 1e-5 stays finite in float32 for any |logit| < 3e33.
MIN_TEMPERATURE = 1e-5


class SamplingError(ValueError):
    """This request's sampling parameters give no valid distribution over tokens."""


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop = tuple(str(s) for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from one row of logits [V] (greedy rows: the engine takes the batch's argmax)."""
    scaled = logits.float() / p.temperature
    if p.top_k and p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop = sorted_probs.cumsum(0) - sorted_probs > p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        raise SamplingError(f"temperature={p.temperature:g}, top_p={p.top_p:g}, top_k={p.top_k} give no valid "
                            f"probability distribution over tokens; use temperature 0 for greedy decoding")
    return int(torch.multinomial(probs, 1, generator=gen).item())


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
