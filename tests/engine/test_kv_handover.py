"""Prefill in one engine, decode in another — in another process — to identical tokens."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.kv_payload import KVPayload
from tests.reference import engine_inputs, greedy, hf_greedy, run_to_completion

WORKER = Path(__file__).with_name("kv_import_worker.py")


def prefill(model, cases, max_tokens):
    engine = Engine(model, EngineConfig(block_size=16, role="prefill"))
    for rid, (text, images) in cases.items():
        ids, embeds = engine_inputs(model, text, images)
        engine.add_request(rid, ids, greedy(max_tokens), images=embeds)
    payloads = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.finished and out.finish_reason == "prefilled" and len(out.new_token_ids) == 1
            payloads[out.request_id] = out.kv
    assert set(engine.handovers) == set(cases), "blocks stay held until the transfer ends"
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_usable_blocks
    for rid in cases:
        assert engine.release(rid) and not engine.release(rid)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    return payloads


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_kv_imported_in_a_separate_process_continues_identically(name, request, make_image, tmp_path, trisect_cache):
    model = request.getfixturevalue(name)
    cases = {"img": ("what is in the image", [make_image(3)]),
             "two": ("compare these two pictures", [make_image(4), make_image(5)]),
             "text": ("just some words to continue", [])}
    payloads = prefill(model, cases, 14)
    paths = []
    for rid, payload in payloads.items():
        paths.append(tmp_path / f"{rid}.kv")
        paths[-1].write_bytes(payload.to_bytes())
    preset = {"tiny_llava": "tiny-llava", "tiny_qwen2_vl": "tiny-qwen2-vl"}[name]
    out_path = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    subprocess.run([sys.executable, str(WORKER), preset, str(trisect_cache), str(out_path), *map(str, paths)],
                   check=True, env=env, timeout=300)
    result = json.loads(out_path.read_text())
    assert result["all_blocks_free"]
    for rid, (text, images) in cases.items():
        first = payloads[rid].token_ids[-1]
        assert [first] + result["tokens"][rid] == hf_greedy(model, text, images, 14), rid


def test_import_in_process_and_recompute_fallback(tiny_qwen2_vl, make_image):
    """A decode engine without free blocks re-prefills from the payload's images: same tokens."""
    model = tiny_qwen2_vl
    cases = {"a": ("look at this", [make_image(11)]), "b": ("and this one too", [make_image(12)])}
    payloads = prefill(model, cases, 10)
    ids_len = max(len(p.token_ids) for p in payloads.values())
    decode = Engine(model, EngineConfig(block_size=4, num_kv_blocks=(ids_len + 10) // 4 + 3, role="decode"))
    for p in payloads.values():
        decode.import_kv(KVPayload.from_dict(p.to_dict()))
    assert len(decode.scheduler.waiting) == 1, "the second import must wait for blocks"
    out = run_to_completion(decode)
    for rid, (text, images) in cases.items():
        assert [payloads[rid].token_ids[-1]] + out[rid] == hf_greedy(model, text, images, 10)


def test_payload_rejects_kv_of_another_shape(tiny_llava):
    payload = prefill(tiny_llava, {"x": ("hello", [])}, 4)["x"]
    payload.kv = payload.kv[:, :, :, :1]                    # as if from a model with one KV head
    with pytest.raises(ValueError, match="does not fit"):
        Engine(tiny_llava).import_kv(payload)
