"""The token-exactness oracle: HF `generate()` greedy on its own, independently loaded model.

Life of a reference: `hf_greedy(loaded, text, images, n)` takes the tokenizer/processor and the
checkpoint *path* from `loaded` but never its model — an Engine built on `loaded` swaps that
model's Linear layers for trisect's SkinnyLinear in place, and tests patch its forward, so a
reference run on it would partly check trisect against itself. `reference_model(loaded)` loads
the same checkpoint a second time with plain transformers (once per path and dtype, cached for
the process), nothing from decoders/ touches it, and `assert_independent` re-checks that before
every reference run. EOS is disabled on both sides so the reference runs its full length (a tiny
random model may emit its eos id early).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from decoders.model import prepare_prompt
from decoders.sampling import SamplingParams
from encoders.vision import VisionEncoder

TRISECT_PACKAGES = ("decoders", "encoders", "services", "cluster")


def reference_model(loaded) -> torch.nn.Module:
    """The HF model of `loaded`'s checkpoint, loaded apart from it with plain transformers."""
    dtype = next(loaded.model.parameters()).dtype if loaded.model is not None else torch.float32
    model = _load_reference(str(Path(loaded.path).resolve()), loaded.family == "text", dtype)
    assert model is not loaded.model
    assert_independent(model)
    return model


@functools.cache
def _load_reference(path: str, text_only: bool, dtype: torch.dtype) -> torch.nn.Module:
    cls = AutoModelForCausalLM if text_only else AutoModelForImageTextToText  # as load_model picks
    return cls.from_pretrained(path, dtype=dtype).eval()


def assert_independent(model: torch.nn.Module) -> None:
    """No trisect class or hook anywhere in the model, no module with a patched forward.
    (transformers itself hooks some layers to capture outputs; those are its own code.)"""
    for name, module in model.named_modules():
        where = name or "<root>"
        assert not _is_trisect(type(module)), f"reference module {where} is {type(module)}"
        assert "forward" not in vars(module), f"reference module {where} has a patched forward"
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            assert not _is_trisect(getattr(hook, "func", hook)), f"reference module {where} has hook {hook}"


def _is_trisect(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] in TRISECT_PACKAGES


def chat_inputs(loaded, text: str, images: list):
    if loaded.family == "text":
        ids = prepare_prompt(loaded, text, []).token_ids
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = loaded.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
    return loaded.processor(text=[prompt], images=images or None, return_tensors="pt")


@torch.inference_mode()
def hf_generate(loaded, inputs: dict, max_new_tokens: int, with_logits: bool = False):
    """Greedy continuation of prepared processor `inputs` on the independent reference model."""
    out = reference_model(loaded).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                                           output_logits=with_logits)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    if with_logits:
        return tokens, torch.stack([l[0].float() for l in out.logits])
    return tokens


def hf_greedy(loaded, text: str, images: list, max_new_tokens: int, with_logits: bool = False):
    """Memoised per (checkpoint, prompt, image pixels, length): a reference is deterministic, and
    the batch tests ask the same ones in-process and over the API."""
    key = (str(Path(loaded.path).resolve()), text, tuple(hashlib.sha256(i.tobytes()).hexdigest() for i in images),
           tuple(i.size for i in images), max_new_tokens, with_logits)
    if key not in _REFERENCES:
        _REFERENCES[key] = hf_generate(loaded, chat_inputs(loaded, text, images), max_new_tokens, with_logits)
    tokens = _REFERENCES[key]
    return (list(tokens[0]), tokens[1].clone()) if with_logits else list(tokens)


_REFERENCES: dict[tuple, object] = {}


def mixed_batch(n: int, make_image) -> dict[str, tuple[str, list]]:
    """`n` requests of mixed prompt lengths, every third with one image and every seventh with two."""
    words = "the small red fox looks at a tall green tree near the river under a bright blue sky".split()
    cases = {}
    for i in range(n):
        text = f"request {i}: " + " ".join(words[(i * 5) % len(words):] + words)[: 8 + (i * 37) % 150]
        images = [make_image(1000 + 10 * i + k) for k in range(2 if i % 7 == 6 else 1 if i % 3 == 0 else 0)]
        cases[f"b{i:02d}"] = (text, images)
    return cases


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
