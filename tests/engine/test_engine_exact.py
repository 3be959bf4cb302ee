"""Engine ≡ HF generate(): every scheduling situation must give exactly the reference's greedy tokens."""
import pytest
import torch

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.sampling import SamplingParams
from tests.reference import engine_inputs, greedy, hf_greedy, run_to_completion

PROMPTS = [
    "hi",
    "describe what you see in this picture",
    "a much longer prompt that keeps going so the prompt length differs a lot from the others here",
    "two words",
    "what colour is the sky on a clear day in summer",
    "list three animals",
    "the quick brown fox jumps over the lazy dog again and again",
    "ok",
]


@pytest.fixture(params=["tiny_llava", "tiny_qwen2_vl"])
def model(request):
    return request.getfixturevalue(request.param)


def assert_all_blocks_free(engine):
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.seqs and not engine.scheduler.running and not engine.scheduler.waiting


def test_single_request_tokens_and_logits(model, make_image):
    image = make_image(1)
    ref_tokens, ref_logits = hf_greedy(model, "describe the picture", [image], 24, with_logits=True)
    assert len(set(ref_tokens)) >= 4, "reference collapsed to few tokens: the test would prove nothing"

    engine = Engine(model, EngineConfig(block_size=8))
    seen = []
    run = engine.runner.run
    engine.runner.run = lambda batch: [seen.append(l.clone()) or (s, l) for s, l in run(batch)]
    ids, embeds = engine_inputs(model, "describe the picture", [image])
    engine.add_request("r", ids, greedy(24), images=embeds)
    out = run_to_completion(engine)

    assert out["r"] == ref_tokens
    # compare logits, not only tokens: a broken mask can keep argmax equal by luck
    assert (torch.stack(seen) - ref_logits).abs().max() < 1e-3
    assert_all_blocks_free(engine)


def test_eight_requests_joining_at_different_steps(model, make_image):
    n_images = [0, 1, 2, 0, 1, 2, 1, 0]
    join_steps = [0, 0, 1, 2, 3, 5, 8, 13]
    cases = {f"r{i}": (PROMPTS[i], [make_image(10 * i + k) for k in range(n_images[i])]) for i in range(8)}
    engine = Engine(model, EngineConfig(block_size=8, max_num_batched_tokens=64))
    join_at = {}
    for i, (rid, (text, images)) in enumerate(cases.items()):
        ids, embeds = engine_inputs(model, text, images)
        join_at.setdefault(join_steps[i], []).append((rid, ids, greedy(16 + i), embeds))
    out = run_to_completion(engine, join_at)
    for i, (rid, (text, images)) in enumerate(cases.items()):
        assert out[rid] == hf_greedy(model, text, images, 16 + i), rid
    assert_all_blocks_free(engine)


def test_fresh_prefill_of_different_lengths_runs_unmasked_and_exact(model, make_image, monkeypatch):
    """Prompts of very different lengths start together: one padded prefill with no mask at all
    (causal attention keeps real tokens off the right padding), then a masked decode batch."""
    cases = {f"f{i}": (PROMPTS[i], [make_image(40 + i)] if i in (1, 4) else []) for i in (0, 1, 2, 4, 7)}
    engine = Engine(model, EngineConfig(block_size=8, max_num_batched_tokens=4096))
    masks = []
    forward = engine.runner.text_model.forward          # the session's shared model: patch, then restore
    monkeypatch.setattr(engine.runner.text_model, "forward",
                        lambda **kw: masks.append(kw.get("attention_mask")) or forward(**kw))
    for rid, (text, images) in cases.items():
        ids, embeds = engine_inputs(model, text, images)
        engine.add_request(rid, ids, greedy(12), images=embeds)
    lengths = {len(s.token_ids) for s in engine.seqs.values()}
    out = run_to_completion(engine)
    assert len(lengths) == len(cases), "the prompts must differ in length so the prefill is padded"
    assert masks[0] is None and all(m is not None for m in masks[1:])
    for rid, (text, images) in cases.items():
        assert out[rid] == hf_greedy(model, text, images, 12), rid
    assert_all_blocks_free(engine)


def test_chunked_prefill_with_budget_smaller_than_the_prompt(model, make_image):
    text, images = PROMPTS[2], [make_image(5)]
    ids, embeds = engine_inputs(model, text, images)
    budget = 7
    assert len(ids) > 3 * budget
    engine = Engine(model, EngineConfig(block_size=4, max_num_batched_tokens=budget))
    engine.add_request("long", ids, greedy(12), images=embeds)
    short_ids, _ = engine_inputs(model, PROMPTS[0], [])
    join = {3: [("short", short_ids, greedy(12), [])]}     # joins mid-prefill of the long one
    out = run_to_completion(engine, join)
    assert out["long"] == hf_greedy(model, text, images, 12)
    assert out["short"] == hf_greedy(model, PROMPTS[0], [], 12)
    assert_all_blocks_free(engine)


def test_prefix_cache_hit_gives_identical_tokens(model, make_image):
    image = make_image(7)
    engine = Engine(model, EngineConfig(block_size=4))
    first_ids, embeds = engine_inputs(model, "tell me about this picture in detail", [image])
    engine.add_request("first", first_ids, greedy(10), images=embeds)
    run_to_completion(engine)
    assert engine.block_manager.prefix_hits == 0

    second_ids, embeds2 = engine_inputs(model, "tell me about this picture briefly", [image])
    common = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
    engine.add_request("second", second_ids, greedy(10), images=embeds2)
    out = run_to_completion(engine)
    assert engine.block_manager.prefix_hits == common // 4 > 0
    assert out["second"] == hf_greedy(model, "tell me about this picture briefly", [image], 10)

    # the same prompt with a different picture must not reuse the image's blocks
    hits_before = engine.block_manager.prefix_hits
    other_ids, other_embeds = engine_inputs(model, "tell me about this picture briefly", [make_image(8)])
    engine.add_request("other", other_ids, greedy(10), images=other_embeds)
    out = run_to_completion(engine)
    first_image_pos = other_ids.index(model.image_token_id)
    assert engine.block_manager.prefix_hits - hits_before == first_image_pos // 4
    assert out["other"] == hf_greedy(model, "tell me about this picture briefly", [make_image(8)], 10)
    assert_all_blocks_free(engine)


def test_preemption_under_a_tiny_block_pool(model, make_image):
    cases = {f"p{i}": (PROMPTS[i], [make_image(i)] if i % 2 else []) for i in range(4)}
    inputs = {rid: engine_inputs(model, t, ims) for rid, (t, ims) in cases.items()}
    longest = max(len(ids) for ids, _ in inputs.values()) + 20
    # room for about two sequences at a time, so decoding four must preempt
    engine = Engine(model, EngineConfig(block_size=4, num_kv_blocks=2 * (longest // 4 + 2)))
    for rid, (ids, embeds) in inputs.items():
        engine.add_request(rid, ids, greedy(20), images=embeds)
    out = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    for rid, (text, images) in cases.items():
        assert out[rid] == hf_greedy(model, text, images, 20), rid
    assert_all_blocks_free(engine)


def test_seeded_sampling_reproduces_and_abort_frees(model):
    ids, _ = engine_inputs(model, PROMPTS[4], [])
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    engine = Engine(model, EngineConfig(block_size=4))
    engine.add_request("a", ids, params)
    engine.add_request("noise", ids[:5], SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True))
    engine.add_request("b", ids, params)
    engine.add_request("doomed", ids, greedy(50))
    out = {}
    for step in range(100):
        if step == 3:
            assert engine.abort("doomed") and not engine.abort("doomed")
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        if not engine.has_unfinished():
            break
    assert out["a"] == out["b"] and len(out["a"]) == 16
    assert out["a"] != hf_greedy(model, PROMPTS[4], [], 16), "sampling at temperature 0.8 should differ from greedy"
    assert_all_blocks_free(engine)


def test_rejects_what_cannot_fit(model):
    engine = Engine(model, EngineConfig(block_size=4, num_kv_blocks=4))
    ids, _ = engine_inputs(model, PROMPTS[0], [])
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", ids, greedy(500))
    engine.add_request("ok", ids[:3], greedy(4))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("ok", ids[:3], greedy(4))


def test_stop_token_ids_and_stop_strings(tiny_llava):
    model, text = tiny_llava, PROMPTS[6]
    ref = hf_greedy(model, text, [], 24)
    ids, _ = engine_inputs(model, text, [])
    decode = lambda toks: model.tokenizer.decode(toks, skip_special_tokens=True)
    stop_string = decode(ref[8:10]).strip()[:4]
    assert stop_string
    cut = next(k for k in range(1, 25) if stop_string in decode(ref[:k]))
    stop_id = ref[6]
    engine = Engine(model, EngineConfig(block_size=4))
    engine.add_request("by-id", ids, SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(stop_id,)))
    engine.add_request("by-string", ids, SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop_string,)))
    reasons = {}
    outs = {"by-id": [], "by-string": []}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert outs["by-id"] == ref[:ref.index(stop_id) + 1] and reasons["by-id"] == "stop"
    assert outs["by-string"] == ref[:cut] and reasons["by-string"] == "stop"
