"""decoders/model.py + encoders/vision.py: presets, loading, prompts, vision embeddings.

The HF checkpoint's own forward / generate is the oracle: whatever we split out (vision
tower, embeddings, decoder stack, lm head, M-RoPE positions) must recombine to its logits.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import decoders.model as dm
from decoders.model import PRESETS, ensure_preset, load_model, prepare_prompt
from encoders.vision import ImageEmbedding, VisionEncoder
from tests.reference import reference_model

FIXTURE = {"tiny-llava": "tiny_llava", "tiny-qwen2-vl": "tiny_qwen2_vl"}
PROMPT = "Describe the image in detail."


@pytest.fixture(params=PRESETS)
def loaded(request):
    return request.getfixturevalue(FIXTURE[request.param])


def _processor_inputs(lm, images, text=PROMPT):
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
    prompt = lm.processor.apply_chat_template([{"role": "user", "content": content}],
                                              add_generation_prompt=True, tokenize=False)
    return lm.processor(text=[prompt], images=images, return_tensors="pt")


def _vision_params(lm):
    parts = dm._VISION_PARTS[lm.family]
    return {n: p for n, p in lm.model.named_parameters() if n.split(".")[1] in parts}


def test_build_is_deterministic_and_cached(loaded, tmp_path, monkeypatch):
    name = loaded.path.name.rsplit("-", 1)[0]
    a, b = ensure_preset(name, tmp_path), loaded.path  # a fresh build vs the session's one
    assert a.name == b.name and a.name.startswith(name + "-")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ta, tb = AutoTokenizer.from_pretrained(a), loaded.tokenizer
    text = "A small red fox jumps over 3 lazy dogs! Ünïcode too."
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    assert ta.decode(ta(text)["input_ids"]) == text  # byte-level BPE round-trips anything
    # a second call must reuse the directory, never rebuild
    monkeypatch.setattr(dm, "_build_preset", lambda *a: pytest.fail("rebuilt a cached preset"))
    assert ensure_preset(name, tmp_path) == a
    assert [p.name for p in tmp_path.iterdir()] == [a.name]  # no temp dirs left


def test_concurrent_builds_leave_one_complete_dir(tmp_path, monkeypatch):
    calls = []

    def fake_build(name, out):  # the real recipe is covered above; this is about the directory dance
        calls.append(name)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")
    monkeypatch.setattr(dm, "_build_preset", fake_build)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_preset("tiny-llava", tmp_path)))
               for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and len(set(paths)) == 1 and list(tmp_path.iterdir()) == [paths[0]]
    assert (paths[0] / "config.json").is_file()
    # another process finishing first: our rename fails, we use its directory and clean up ours
    other = tmp_path / "other"
    final = other / paths[0].name

    def build_and_lose_race(name, out):
        fake_build(name, out)
        final.mkdir()
        (final / "config.json").write_text('{"winner": 1}')
    monkeypatch.setattr(dm, "_build_preset", build_and_lose_race)
    assert ensure_preset("tiny-llava", other) == final
    assert list(other.iterdir()) == [final] and "winner" in (final / "config.json").read_text()


def test_hf_generate_varies(loaded, make_image):
    enc = _processor_inputs(loaded, [make_image(1)])
    with torch.inference_mode():
        # the checkpoint's own greedy output, on the copy no engine has patched (tests/reference.py)
        out = reference_model(loaded).generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=None)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert len(new) == 24 and len(set(new)) >= 4, new


def test_prepare_prompt_matches_processor(loaded, make_image):
    images = [make_image(1), make_image(2, (112, 84))]
    pp = prepare_prompt(loaded, PROMPT, images)
    enc = _processor_inputs(loaded, images)
    assert pp.token_ids == enc["input_ids"][0].tolist()
    assert len(pp.pixel_inputs) == 2
    merged = torch.cat([d["pixel_values"] for d in pp.pixel_inputs])
    assert torch.equal(merged, enc["pixel_values"])
    if loaded.family == "qwen2_vl":
        grids = torch.cat([d["image_grid_thw"] for d in pp.pixel_inputs])
        assert torch.equal(grids, enc["image_grid_thw"])
    assert prepare_prompt(loaded, "hi", []).token_ids.count(loaded.image_token_id) == 0


def test_merged_embeddings_reproduce_hf_logits(loaded, make_image):
    images = [make_image(3), make_image(4, (112, 84)), make_image(5, (40, 72))]
    pp = prepare_prompt(loaded, PROMPT, images)
    embs = VisionEncoder(loaded).encode(pp.pixel_inputs)
    ids = torch.tensor([pp.token_ids])
    is_img = ids == loaded.image_token_id
    assert [e.num_tokens for e in embs] == _placeholder_runs(pp.token_ids, loaded.image_token_id)
    with torch.inference_mode():
        embeds = loaded.embed_tokens()(ids)
        embeds[is_img] = torch.cat([e.embeds for e in embs])
        kwargs = {}
        if loaded.family == "qwen2_vl":
            grid = torch.tensor([e.grid_thw for e in embs])
            pos, deltas = loaded.model.model.get_rope_index(ids, mm_token_type_ids=is_img.int(),
                                                              image_grid_thw=grid)
            assert pos.shape == (3, 1, ids.shape[1]) and deltas.shape == (1, 1)
            kwargs["position_ids"] = pos
        ours = loaded.model(inputs_embeds=embeds, **kwargs).logits
        hidden = loaded.text_model()(inputs_embeds=embeds, **kwargs).last_hidden_state
        split = loaded.lm_head()(hidden)
        ref = reference_model(loaded)(**_processor_inputs(loaded, images)).logits  # its own copy
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(split, ref, atol=1e-4, rtol=0)


def _placeholder_runs(ids, tok):
    runs, n = [], 0
    for t in ids + [None]:
        if t == tok:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    return runs


def test_vision_only_load(loaded, make_image, trisect_cache):
    vo = load_model(loaded.path.name.rsplit("-", 1)[0], cache_dir=trisect_cache, vision_only=True)
    names = [n for n, _ in vo.model.named_parameters()]
    assert not [n for n in names if "language_model" in n or "lm_head" in n]
    full_vision = _vision_params(loaded)
    assert sorted(names) == sorted(full_vision)
    assert sum(p.numel() for p in vo.model.parameters()) == sum(p.numel() for p in full_vision.values())
    assert all(p.device.type == "cpu" for p in vo.model.parameters())
    with pytest.raises(RuntimeError):
        vo.text_model()
    pixels = prepare_prompt(loaded, PROMPT, [make_image(6), make_image(7, (90, 60))]).pixel_inputs
    ref, got = VisionEncoder(loaded).encode(pixels), VisionEncoder(vo).encode(pixels)
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r.embeds, g.embeds) and r.grid_thw == g.grid_thw


def test_batched_encode_equals_one_by_one(loaded, make_image):
    pixels = prepare_prompt(loaded, PROMPT, [make_image(8), make_image(9, (112, 112))]).pixel_inputs
    enc = VisionEncoder(loaded)
    batched = enc.encode(pixels)
    single = [enc.encode([p])[0] for p in pixels]
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(b.embeds, s.embeds, atol=1e-4, rtol=0)  # batching reorders float sums
        assert b.embeds.untyped_storage().size() == b.embeds.nbytes  # owns its memory, no batch view
    assert enc.encode([]) == []
    with pytest.raises(ValueError):
        ImageEmbedding(embeds=torch.zeros(0, 4))


def test_text_only_checkpoint(tiny_llava, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tiny_llava.tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.family == "text" and lm.processor is None and lm.image_token_id is None
    assert lm.eos_token_ids == (tok.eos_token_id,)
    assert lm.text_model() is lm.model.model and lm.lm_head() is lm.model.lm_head
    pp = prepare_prompt(lm, "hello there", [])
    assert pp.token_ids == tok.apply_chat_template([{"role": "user", "content": "hello there"}],
                                                   add_generation_prompt=True, return_dict=False)
    with pytest.raises(ValueError):
        prepare_prompt(lm, "hello", [object()])
    with pytest.raises(ValueError):
        load_model(str(tmp_path), vision_only=True)


def test_bad_names(tmp_path):
    with pytest.raises(ValueError):
        ensure_preset("tiny-nothing", tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))
