"""KVPayload: everything a decode engine needs to continue a sequence another engine prefilled.

Made by a prefill-only engine the step the first token is sampled (`Engine.step` attaches it to
that request's StepOutput), moved by a kv_transfer backend, consumed by `Engine.import_kv`. The KV
is a copy, so the source's blocks are free to reuse the moment the payload exists. Image
embeddings ride along (they are small next to the KV) so the decode side can still preempt the
sequence by recompute. `to_dict`/`from_dict` use only tensors and primitives, so the payload
crosses processes with `torch.save` / `torch.load(weights_only=True)` — no pickled objects.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import torch

from decoders.sampling import SamplingParams


@dataclass(slots=True)
class PayloadImage:
    embeds: torch.Tensor
    grid_thw: tuple[int, int, int] | None = None
    content_hash: str = ""


@dataclass(slots=True)
class KVPayload:
    request_id: str
    token_ids: list[int]              # prompt + the first sampled token
    num_prompt_tokens: int
    kv: torch.Tensor                  # [layers, 2, num_computed, kv_heads, head_dim]
    block_size: int
    sampling: SamplingParams
    rope_delta: int = 0
    mrope_positions: torch.Tensor | None = None
    images: list[PayloadImage] = field(default_factory=list)
    generator_state: torch.Tensor | None = None

    def __post_init__(self):
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(f"kv must be [layers, 2, tokens, heads, dim], got {tuple(self.kv.shape)}")
        if self.kv.shape[2] != len(self.token_ids) - 1:
            raise ValueError(f"payload has KV for {self.kv.shape[2]} tokens but {len(self.token_ids)} "
                             "token ids (expected exactly one uncomputed token)")

    @property
    def num_computed_tokens(self) -> int:
        return self.kv.shape[2]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__ if k not in ("sampling", "images")}
        d["sampling"] = asdict(self.sampling)
        d["images"] = [{"embeds": i.embeds, "grid_thw": list(i.grid_thw) if i.grid_thw else None,
                        "content_hash": i.content_hash} for i in self.images]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KVPayload":
        d = dict(d)
        s = d.pop("sampling")
        d["sampling"] = SamplingParams(**{**s, "stop_token_ids": tuple(s["stop_token_ids"]), "stop": tuple(s["stop"])})
        d["images"] = [PayloadImage(i["embeds"], tuple(i["grid_thw"]) if i["grid_thw"] else None, i["content_hash"])
                       for i in d["images"]]
        return cls(**d)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "KVPayload":
        return cls.from_dict(torch.load(io.BytesIO(data), weights_only=True))
