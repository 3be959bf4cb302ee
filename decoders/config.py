"""EngineConfig: every knob of one engine instance, validated once at construction.

The engine, scheduler, block manager and model runner all read this one object; nothing else
carries tuning state. `num_kv_blocks` is derived from `kv_cache_memory` when the model runner
knows the per-token KV footprint of the checkpoint (see `kv_cache.blocks_for_budget`).
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("aggregated", "prefill", "decode")


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int = 256 * 2**20   # bytes for the KV pool when num_kv_blocks is not given
    num_kv_blocks: int | None = None      # overrides kv_cache_memory (tests use tiny pools)
    max_num_seqs: int = 64                # sequences in the running batch
    max_num_batched_tokens: int = 2048    # per-step token budget shared by prefill chunks and decodes
    max_model_len: int | None = None      # defaults to the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    role: str = "aggregated"              # "prefill": stop after the first token and hand KV over
    num_threads: int | None = None        # torch intra-op threads (Ray sets OMP to 1 in replicas)
    retain_freed_memory: bool = True      # glibc keeps freed activations mapped (see host_memory.py)
    skinny_linear: bool = True            # decode-batch GEMMs as (W @ x.T).T on CPU (see skinny_linear.py)

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be >= 2 (block 0 is the reserved null block)")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
