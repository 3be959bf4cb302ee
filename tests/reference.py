"""The token-exactness oracle: HF `generate()` greedy on the same checkpoint and inputs.

Every serving-path test compares against `hf_greedy`. EOS is disabled on both sides so the
reference runs its full length (a tiny random model may emit its eos id early).
"""
from __future__ import annotations

import hashlib

import torch

from decoders.model import prepare_prompt
from decoders.sampling import SamplingParams
from encoders.vision import VisionEncoder


def chat_inputs(loaded, text: str, images: list):
    if loaded.family == "text":
        ids = prepare_prompt(loaded, text, []).token_ids
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = loaded.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
    return loaded.processor(text=[prompt], images=images or None, return_tensors="pt")


@torch.inference_mode()
def hf_greedy(loaded, text: str, images: list, max_new_tokens: int, with_logits: bool = False):
    inputs = chat_inputs(loaded, text, images)
    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0, return_dict_in_generate=True, output_logits=with_logits)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    if with_logits:
        return tokens, torch.stack([l[0].float() for l in out.logits])
    return tokens


def engine_inputs(loaded, text: str, images: list):
    """(prompt token ids, image embeddings) exactly as an ingress would hand them to an engine."""
    prepared = prepare_prompt(loaded, text, images)
    embeds = VisionEncoder(loaded).encode(prepared.pixel_inputs) if images else []
    for i, e in enumerate(embeds):
        e.content_hash = hashlib.sha256(images[i].tobytes()).hexdigest()
    return prepared.token_ids, embeds


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def run_to_completion(engine, join_at: dict[int, list] | None = None) -> dict[str, list[int]]:
    """Step the engine until idle; `join_at[step]` holds add_request arg tuples added before that step."""
    join_at = dict(join_at or {})
    outputs: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or join_at:
        for args in join_at.pop(step, []):
            engine.add_request(*args)
            outputs.setdefault(args[0], [])
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
        assert step < 10_000, "engine did not finish"
    return outputs
