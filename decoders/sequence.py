"""Sequence: one request's state inside an engine, from admission to finish.

Life: created WAITING with its prompt (placeholders already expanded, one image embedding per
image) → the scheduler admits it (RUNNING, blocks allocated, maybe a prefix-cache hit) → chunks of
its uncomputed tokens are run until every token but the last sampled one has KV → each further step
computes one token and samples the next → FINISHED (stop, length, abort or, in prefill-only
mode, handed over). Preemption sends it back to WAITING with all its tokens to recompute.

Invariant the whole engine relies on: `num_computed_tokens` tokens have KV in `block_table`; the
tokens after them are computed by the next step that schedules this sequence, and a token is
sampled only when that step reaches the end of `token_ids`.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from decoders.sampling import SamplingParams, make_generator


# never reused, unlike id(): a sequence allocated where a finished one lived must not pass for it
_SERIALS = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    images: list = field(default_factory=list)          # ImageEmbedding-like: .embeds, .grid_thw, .content_hash
    image_positions: torch.Tensor | None = None          # prompt positions of image placeholder tokens
    mrope_positions: torch.Tensor | None = None          # (3, num_prompt_tokens) for Qwen2-VL prompts
    rope_delta: int = 0                                  # Qwen2-VL: position of token i >= prompt is i + delta
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0                            # prefix-cache hit at the last admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    image_embeds: torch.Tensor | None = None             # images' embeds concatenated in placeholder order
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks, memoised
    num_committed_blocks: int = 0                         # leading blocks already registered for reuse
    serial: int = field(default_factory=lambda: next(_SERIALS))  # unique in the process (decode staging)

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")
        self.token_ids = [int(t) for t in self.token_ids]
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)
        if self.images:
            self.image_embeds = torch.cat([img.embeds for img in self.images], dim=0)
        if self.generator is None:
            self.generator = make_generator(self.sampling.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def image_spans(self) -> list[tuple[int, int, str]]:
        """(first placeholder position, last position, content hash) per image, for block hashing."""
        spans, start = [], 0
        for img in self.images:
            n = img.embeds.shape[0]
            pos = self.image_positions[start:start + n]
            spans.append((int(pos[0]), int(pos[-1]), img.content_hash or ""))
            start += n
        return spans
