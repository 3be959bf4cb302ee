"""Engine: the loop every trisect instance runs — add requests, `step()`, stream tokens out.

`step()` = schedule → run one forward per group → sample → append / check stops → free finished.
Roles: an aggregated engine runs a request to the end; a prefill-only engine (`role="prefill"`)
finishes each request right after its first token, returning a `KVPayload` in that StepOutput and
holding the sequence's blocks until the transfer layer calls `release()` (SUCCESS or FAILED);
a decode engine takes such payloads with `import_kv` and continues as if it had prefilled itself.
The engine knows nothing of Ray, Redis or RPC; it is single-threaded — callers serialise access.

Isolation: a request's own work — admission, sampling its row, its stop check, its handover — is
kept apart from the others'. If it raises, that request alone ends, with a StepOutput whose
finish_reason is "error" and whose `error` says why: a SamplingError (a ValueError) when its
parameters are at fault, else a RuntimeError naming no internals (the traceback goes to the log).
An add_request / import_kv that raises leaves nothing behind. Only a failure of the batch itself
(scheduling, the forward pass) escapes `step()`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from decoders.block_manager import BlockManager
from decoders.config import EngineConfig
from decoders.host_memory import retain_freed_memory
from decoders.kv_payload import KVPayload, PayloadImage
from decoders.model_runner import ModelRunner
from decoders.sampling import SamplingError, SamplingParams, sample_row
from decoders.scheduler import Scheduler
from decoders.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "prefilled" | "error"
    kv: KVPayload | None = None           # prefill role: the handover, on the finishing output
    block_hashes: list[bytes] = field(default_factory=list)  # on finish: its cached blocks, for routing
    error: Exception | None = None        # finish_reason "error": why this request (alone) failed


class Engine:
    def __init__(self, loaded, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.retain_freed_memory:
            retain_freed_memory()
        self.loaded = loaded
        self.runner = ModelRunner(loaded, config)
        self.block_manager = BlockManager(self.runner.pool.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        # prefill role: finished sequences whose blocks stay held until their KV transfer ends
        self.handovers: dict[str, Sequence] = {}

    # ---- requests in -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
                    images=()) -> None:
        seq = Sequence(request_id, list(prompt_token_ids), sampling or SamplingParams(), images=list(images))
        self._admit(seq)
        self.scheduler.add(seq)

    def import_kv(self, payload: KVPayload) -> None:
        """Continue a sequence another engine prefilled; falls back to recompute if no blocks are free."""
        if tuple(payload.kv.shape[i] for i in (0, 3, 4)) != (self.runner.shape.num_layers,
                                                            self.runner.shape.num_kv_heads, self.runner.shape.head_dim):
            raise ValueError(f"payload KV shape {tuple(payload.kv.shape)} does not fit this model")
        seq = Sequence(payload.request_id, list(payload.token_ids), payload.sampling,
                       images=list(payload.images), num_prompt_tokens=payload.num_prompt_tokens,
                       mrope_positions=payload.mrope_positions, rope_delta=payload.rope_delta)
        if payload.generator_state is not None and seq.generator is not None:
            seq.generator.set_state(payload.generator_state)
        self._admit(seq)
        try:
            if self.block_manager.can_append(seq, len(seq)) and len(self.scheduler.running) < self.config.max_num_seqs:
                self.block_manager.ensure_slots(seq, len(seq))
                self.runner.pool.write(self.runner.pool.slots(seq.block_table, 0, payload.num_computed_tokens),
                                       payload.kv)
                seq.num_computed_tokens = payload.num_computed_tokens
                self.block_manager.commit(seq)
                self.scheduler.add_running(seq)
            else:
                self.scheduler.add(seq)
        except Exception:                   # a bad payload: leave no sequence or block behind
            del self.seqs[seq.request_id]
            self.scheduler.finish(seq, "error")
            raise

    def _admit(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise ValueError(f"request id {seq.request_id!r} is already in this engine")
        if seq.num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {seq.num_prompt_tokens} tokens; the model's context is {self.max_model_len}")
        longest = min(seq.num_prompt_tokens + seq.sampling.max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_usable_blocks:
            raise ValueError(f"a {longest}-token sequence needs more KV blocks than this engine has "
                             f"({self.block_manager.num_usable_blocks} x {self.config.block_size} tokens)")
        self.runner.prepare(seq)
        self.seqs[seq.request_id] = seq

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return self.release(request_id)
        self.scheduler.finish(seq, "abort")
        return True

    def release(self, request_id: str) -> bool:
        """Free a handed-over sequence's blocks: call once its KV transfer succeeded or failed
        (never before — a transfer may still be reading them)."""
        seq = self.handovers.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = self.runner.run(batch)
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        if not sampled:
            return []
        greedy = torch.stack([l for _, l in sampled]).argmax(dim=-1).tolist()
        outs = []
        for (seq, logits), token in zip(sampled, greedy):
            try:                            # one request's failure is its own (see the docstring)
                if not seq.sampling.greedy:
                    token = sample_row(logits, seq.sampling, seq.generator)
                outs.append(self._postprocess(seq, token))
            except Exception as e:
                outs.append(self._fail(seq, e))
        return outs

    def _fail(self, seq: Sequence, error: Exception) -> StepOutput:
        if not isinstance(error, SamplingError):   # its parameters' fault, told as is; else ours, logged
            log.exception("request %s failed in the engine; the rest of its batch goes on", seq.request_id)
            error = RuntimeError(f"request {seq.request_id} failed inside the engine ({type(error).__name__})")
        self.handovers.pop(seq.request_id, None)
        self.seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq, "error")
        return StepOutput(seq.request_id, [], True, "error", error=error)

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        seq.token_ids.append(token)
        reason = self._stop_reason(seq, token)
        if reason is None and self.config.role == "prefill":
            reason = "prefilled"
        out = StepOutput(seq.request_id, [token], reason is not None, reason)
        if reason is not None:
            out.block_hashes = list(seq.block_hashes)
        if reason == "prefilled":
            out.kv = self.export_kv(seq)
            self.scheduler.running.remove(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
            self.handovers[seq.request_id] = seq
        elif reason is not None:
            self.scheduler.finish(seq, reason)
        if reason is not None:
            del self.seqs[seq.request_id]
        return out

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.sampling
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self._hits_stop_string(seq):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _hits_stop_string(self, seq: Sequence) -> bool:
        # only the tail can newly contain a stop string; decode enough tokens to cover the longest
        window = max(len(s) for s in seq.sampling.stop) + 8
        tail = self.loaded.tokenizer.decode(seq.output_token_ids[-window:], skip_special_tokens=True)
        return any(s in tail for s in seq.sampling.stop)

    def export_kv(self, seq: Sequence) -> KVPayload:
        """Copy out the KV of every computed token (the prompt, for a prefilled sequence)."""
        slots = self.runner.pool.slots(seq.block_table, 0, seq.num_computed_tokens)
        return KVPayload(
            request_id=seq.request_id, token_ids=list(seq.token_ids), num_prompt_tokens=seq.num_prompt_tokens,
            kv=self.runner.pool.read(slots), block_size=self.config.block_size, sampling=seq.sampling,
            rope_delta=seq.rope_delta, mrope_positions=seq.mrope_positions,
            images=[PayloadImage(i.embeds, tuple(i.grid_thw) if i.grid_thw else None, i.content_hash)
                    for i in seq.images],
            generator_state=seq.generator.get_state() if seq.generator is not None else None)
