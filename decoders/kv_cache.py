"""Paged KV memory, and the transformers `Cache` that lets the checkpoint's own modelling code use it.

`KVPool` owns one tensor per model: [layers, 2 (k/v), num_blocks * block_size, kv_heads, head_dim],
i.e. a `[blocks, block_size, heads, dim]` layout per layer, flattened over slots so a token's slot
is `block * block_size + offset`. Block 0 stays zero (the null block pads block tables).

`PagedCache` is built once per engine. Before each forward the model runner `plan()`s the step:
which flat rows of this step's new K/V are real tokens and the slots they go to, and for every
batch row the slots of its whole context (new tokens included) padded with slot 0. During the
forward each attention layer calls `update(k, v, layer_idx)` (no other kwargs exist in
transformers 5.x): the layer scatters the real rows with `index_copy_` (advanced-index assignment
stalls on CPU) and gathers the context with one `index_select`, returning K/V exactly `kv_len` long,
which the runner's 4D mask already covers. A *fresh* prefill (every row starts its prompt in this
step) has no context but its own tokens: the plan then carries no read slots, the layer hands the
step's K/V straight back, and attention runs causal without a mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(slots=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self):
        if min(self.num_layers, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError(f"bad KV shape {self}")

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @classmethod
    def from_text_config(cls, cfg, dtype: torch.dtype) -> "KVShape":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, dtype)


def blocks_for_budget(shape: KVShape, block_size: int, budget_bytes: int) -> int:
    return max(2, budget_bytes // (shape.bytes_per_token() * block_size))


class KVPool:
    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, device="cpu"):
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        self.data = torch.zeros(shape.num_layers, 2, num_blocks * block_size, shape.num_kv_heads,
                                shape.head_dim, dtype=shape.dtype, device=device)

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slots of token positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """KV of the given slots for every layer: [layers, 2, n, heads, dim] (a copy)."""
        return self.data.index_select(2, slots)

    def write(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        self.data.index_copy_(2, slots, kv.to(self.data.dtype))


@dataclass(slots=True)
class StepPlan:
    kv_len: int                  # K/V length every row attends over (its longest context)
    write_rows: torch.Tensor     # [n_real] indices into the step's flattened [B * Q] new tokens
    write_slots: torch.Tensor    # [n_real] pool slots they are written to
    read_slots: torch.Tensor | None = None  # [B, kv_len] context slots padded with slot 0; None: fresh
    staging: str = "none"        # decode groups: "build" the staging buffers, or "append" to them
    stage_index: torch.Tensor | None = None   # append: flat [B*H] rows of the staging buffer to write

    def __post_init__(self):
        if self.read_slots is not None and self.read_slots.shape[1] != self.kv_len:
            raise ValueError(f"read_slots cover {self.read_slots.shape[1]} positions, kv_len is {self.kv_len}")
        if self.staging not in ("none", "build", "append") or (self.staging == "append") != (self.stage_index is not None):
            raise ValueError(f"bad staging plan {self.staging!r}")

    @property
    def fresh(self) -> bool:
        return self.read_slots is None and self.staging == "none"


class DecodeStaging:
    """Contiguous K/V ([rows, heads, capacity, dim] per layer) for a steady decode batch.

    Gathering every row's whole context from the paged pool each step costs as much as the
    GEMMs on CPU. While the decode batch keeps the same sequences, each step instead appends one
    token per row here (the pool is written too, so nothing depends on this cache). Any change in
    the batch — a sequence joining, finishing, being preempted — rebuilds it with one gather.
    Unused tail positions hold stale but finite values; the step's mask hides them."""

    def __init__(self):
        self.rows: tuple[int, ...] = ()          # serial of each row's Sequence, in batch order (not id():
                                                 # a new sequence can reuse a finished one's address)
        self.lens: list[int] = []                # tokens each row holds after the last step
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def reserve(self, layers: int, rows: int, heads: int, length: int, dim: int, dtype) -> None:
        if self.k and self.k[0].shape[0] >= rows and self.capacity >= length:
            return
        cap = max(length + 128, self.capacity)       # headroom: appends rebuild only when it runs out
        shape = (max(rows, self.k[0].shape[0] if self.k else 0), heads, cap, dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]


class PagedLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, cache: "PagedCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # the pool exists up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan, pool = self.cache.plan, self.cache.pool.data[self.layer_idx]
        b, h, q, d = key_states.shape
        for kind, states in enumerate((key_states, value_states)):
            rows = states.transpose(1, 2).reshape(b * q, h, d).index_select(0, plan.write_rows)
            pool[kind].index_copy_(0, plan.write_slots, rows.to(pool.dtype))
        if plan.fresh:
            return key_states, value_states
        staging, n = self.cache.staging, plan.kv_len
        if plan.staging == "append":
            for buf, states in ((staging.k[self.layer_idx], key_states), (staging.v[self.layer_idx], value_states)):
                buf.view(-1, d).index_copy_(0, plan.stage_index, states.reshape(b * h, d).to(buf.dtype))
            return (staging.k[self.layer_idx][:b, :, :n].to(key_states.dtype),
                    staging.v[self.layer_idx][:b, :, :n].to(value_states.dtype))
        flat = plan.read_slots.reshape(-1)
        k = pool[0].index_select(0, flat).view(b, n, h, d).transpose(1, 2)
        v = pool[1].index_select(0, flat).view(b, n, h, d).transpose(1, 2)
        if plan.staging == "build":
            staging.k[self.layer_idx][:b, :, :n] = k
            staging.v[self.layer_idx][:b, :, :n] = v
        return k.to(key_states.dtype), v.to(value_states.dtype)

    def get_seq_length(self) -> int:
        plan = self.cache.plan
        return 0 if plan is None or plan.fresh else plan.kv_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.plan.kv_len, 0

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """One per engine; re-planned before every forward, never rebuilt."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.plan: StepPlan | None = None
        self.staging = DecodeStaging()
        super().__init__(layers=[PagedLayer(self, i) for i in range(pool.shape.num_layers)])

    @property
    def is_compileable(self) -> bool:
        return False
