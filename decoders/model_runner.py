"""ModelRunner: one scheduled batch → one padded forward of the checkpoint's own HF text model.

For every sequence it knows how to place tokens: flat pool slots from the block table, positions
(plain, or Qwen2-VL's 3-row M-RoPE positions for the prompt and `i + rope_delta` after it), and
image embeddings scattered over the placeholder tokens of the chunk. A batch is split into a
decode group (one token per row) and a prefill group (chunks padded to the longest), each run as
`[B, Q]` with an explicit additive 4D mask: additive so that eager and sdpa attention agree
(eager adds the mask to the scores; a bool mask there is silently wrong). A prefill group whose
rows all start their prompts in this step runs without one: plain causal attention is exact there
(a real token never looks right, where the padding is) and lets SDPA skip the masked half and the
GQA key/value copies. Only the rows that reach the end of their sequence go through `lm_head`.
"""
from __future__ import annotations

import torch

from decoders.config import EngineConfig
from decoders.kv_cache import KVPool, KVShape, PagedCache, StepPlan, blocks_for_budget
from decoders.sequence import Sequence
from decoders.skinny_linear import use_skinny_linear


class ModelRunner:
    def __init__(self, loaded, config: EngineConfig):
        self.loaded = loaded
        self.text_model, self.lm_head, self.embed = loaded.text_model(), loaded.lm_head(), loaded.embed_tokens()
        self.dtype = next(self.text_model.parameters()).dtype
        if config.skinny_linear:
            use_skinny_linear(self.text_model)
            use_skinny_linear(self.lm_head)
        text_cfg = loaded.model.config.get_text_config()
        self.shape = KVShape.from_text_config(text_cfg, self.dtype)
        self.block_size = config.block_size
        num_blocks = config.num_kv_blocks or blocks_for_budget(self.shape, config.block_size, config.kv_cache_memory)
        self.pool = KVPool(self.shape, num_blocks, config.block_size)
        self.cache = PagedCache(self.pool)
        self.max_model_len = config.max_model_len or getattr(text_cfg, "max_position_embeddings", 4096)
        self.mrope = loaded.family == "qwen2_vl"
        self.mask_min = torch.finfo(self.dtype).min

    # ---- per-sequence preparation (once, at admission) ------------------------------------------
    @torch.inference_mode()
    def prepare(self, seq: Sequence) -> None:
        """Find image placeholders and, for Qwen2-VL prompts with images, the M-RoPE positions."""
        ids = torch.tensor(seq.token_ids[:seq.num_prompt_tokens])
        image_token = self.loaded.image_token_id
        is_image = ids == image_token if image_token is not None else torch.zeros_like(ids, dtype=torch.bool)
        if seq.images or is_image.any():
            seq.image_positions = is_image.nonzero().flatten()
            rows = 0 if seq.image_embeds is None else seq.image_embeds.shape[0]
            if rows != seq.image_positions.numel():
                raise ValueError(f"request {seq.request_id}: {seq.image_positions.numel()} image placeholder "
                                 f"tokens but {rows} image embedding rows")
        if self.mrope and seq.images and seq.mrope_positions is None:
            grid = torch.tensor([img.grid_thw for img in seq.images], dtype=torch.long)
            pos, delta = self.loaded.model.model.get_rope_index(
                ids[None], mm_token_type_ids=is_image.int()[None], image_grid_thw=grid)
            seq.mrope_positions, seq.rope_delta = pos[:, 0], int(delta.item())

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """Run the batch; (sequence, float32 logits of its next token) for rows that reached the end."""
        decodes = [(s, n) for s, n in batch if n == 1]
        prefills = [(s, n) for s, n in batch if n > 1]
        out = []
        for group in (decodes, prefills):
            if group:
                out.extend(self._forward(group))
        return out

    def _forward(self, group: list[tuple[Sequence, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        seqs = [s for s, _ in group]
        lens = torch.tensor([n for _, n in group])
        starts = torch.tensor([s.num_computed_tokens for s in seqs])
        ends = starts + lens
        b, q, kv_len = len(group), int(lens.max()), int(ends.max())

        ids = torch.tensor([s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n] + [0] * (q - n)
                            for s, n in group])
        qpos = starts[:, None] + torch.arange(q)[None]               # [B, Q] absolute positions
        embeds = self.embed(ids)
        self._merge_images(embeds, group)

        self.cache.plan = plan = self._plan(seqs, lens, starts, qpos, kv_len)
        # a fresh prefill needs no mask: causality alone keeps each real token off the right padding
        mask = None if plan.fresh else self._mask(qpos, ends, kv_len)
        hidden = self.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=self._positions(seqs, qpos),
                                 past_key_values=self.cache, use_cache=True).last_hidden_state
        self.cache.plan = None

        done = [row for row, seq in enumerate(seqs) if int(ends[row]) == len(seq)]
        if not done:
            return []
        rows = torch.tensor(done)
        logits = self.lm_head(hidden[rows, lens[rows] - 1]).float()
        return [(seqs[row], logits[i]) for i, row in enumerate(done)]

    def _mask(self, qpos: torch.Tensor, ends: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Additive [B, 1, Q, kv_len] mask: a token sees its own row's context up to itself."""
        kpos = torch.arange(kv_len)
        allowed = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ends[:, None, None])
        return torch.zeros(len(qpos), 1, qpos.shape[1], kv_len, dtype=self.dtype).masked_fill_(
            ~allowed[:, None], self.mask_min)

    def _plan(self, seqs, lens, starts, qpos, kv_len) -> StepPlan:
        q, bs = qpos.shape[1], self.block_size
        if q == 1:                                                    # decode: row i writes its one token
            slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, starts.tolist())]
            plan = StepPlan(kv_len, torch.arange(len(seqs)), torch.tensor(slots))
            self._plan_staging(plan, seqs, starts + 1)
            return plan
        tables = self._tables(seqs)
        real = torch.arange(q)[None] < lens[:, None]                   # [B, Q] real (not padding) tokens
        write_rows = real.flatten().nonzero().flatten()
        flat_pos = qpos.flatten()[write_rows]
        write_slots = tables[write_rows // q, flat_pos // bs] * bs + flat_pos % bs
        if not bool(starts.any()):                                    # fresh: nothing to read back
            return StepPlan(kv_len, write_rows, write_slots)
        return StepPlan(kv_len, write_rows, write_slots, self._read_slots(tables, starts + lens, kv_len))

    @staticmethod
    def _tables(seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.long)

    def _read_slots(self, tables: torch.Tensor, ends: torch.Tensor, kv_len: int) -> torch.Tensor:
        kpos = torch.arange(kv_len)
        read = tables[:, kpos // self.block_size] * self.block_size + kpos % self.block_size
        return read.masked_fill_(kpos[None] >= ends[:, None], 0)

    def _plan_staging(self, plan: StepPlan, seqs: list[Sequence], ends: torch.Tensor) -> None:
        """Decode group: append to the staging buffers if the batch is the one they hold, else
        gather the context (read slots) and rebuild them."""
        st, s = self.cache.staging, self.shape
        rows = tuple(seq.serial for seq in seqs)
        steady = (rows == st.rows and plan.kv_len <= st.capacity
                  and all(seq.num_computed_tokens == n for seq, n in zip(seqs, st.lens)))
        if steady:
            cap = st.capacity
            starts = ends - 1
            plan.staging = "append"
            plan.stage_index = ((torch.arange(len(seqs))[:, None] * s.num_kv_heads
                                 + torch.arange(s.num_kv_heads)[None]) * cap + starts[:, None]).flatten()
        else:
            st.reserve(s.num_layers, len(seqs), s.num_kv_heads, plan.kv_len, s.head_dim, s.dtype)
            plan.staging = "build"
            plan.read_slots = self._read_slots(self._tables(seqs), ends, plan.kv_len)
        st.rows, st.lens = rows, ends.tolist()

    def _positions(self, seqs: list[Sequence], qpos: torch.Tensor) -> torch.Tensor:
        if not self.mrope:
            return qpos
        deltas = torch.tensor([s.rope_delta for s in seqs])
        pos = (qpos + deltas[:, None])[None].expand(3, -1, -1).clone()
        for row, seq in enumerate(seqs):
            if seq.mrope_positions is None:
                continue
            s = int(qpos[row, 0])
            n = min(seq.num_prompt_tokens - s, pos.shape[2])
            if n > 0:                                                 # chunk overlaps the prompt
                pos[:, row, :n] = seq.mrope_positions[:, s:s + n]
        return pos

    def _merge_images(self, embeds: torch.Tensor, group: list[tuple[Sequence, int]]) -> None:
        for row, (seq, n) in enumerate(group):
            if seq.image_embeds is None:
                continue
            s = seq.num_computed_tokens
            pos = seq.image_positions
            hit = ((pos >= s) & (pos < s + n)).nonzero().flatten()
            if hit.numel():
                embeds[row, pos[hit] - s] = seq.image_embeds[hit].to(embeds.dtype)
