"""Engine ≡ HF generate() at the batch sizes users reach: 40 concurrent requests, so the decode
steps run 32–48 rows — the range where SkinnyLinear takes its transposed GEMM — against the
independent reference, request by request."""
import pytest

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.skinny_linear import SKINNY_ROWS, SkinnyLinear
from tests.reference import engine_inputs, greedy, hf_greedy, mixed_batch, run_to_completion

N, NEW_TOKENS = 40, 16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_forty_concurrent_requests_are_token_exact(name, request, make_image):
    model = request.getfixturevalue(name)
    cases = mixed_batch(N, make_image)
    engine = Engine(model, EngineConfig(block_size=16, max_num_seqs=48, max_num_batched_tokens=1024))
    decode_rows = []
    run = engine.runner.run
    engine.runner.run = lambda batch: decode_rows.append(sum(n == 1 for _, n in batch)) or run(batch)
    join_at = {}
    for i, (rid, (text, images)) in enumerate(cases.items()):
        ids, embeds = engine_inputs(model, text, images)
        # 32 start together, the rest join one per step while the others decode
        join_at.setdefault(0 if i < 32 else i - 31, []).append((rid, ids, greedy(NEW_TOKENS), embeds))
    out = run_to_completion(engine, join_at)

    assert any(isinstance(m, SkinnyLinear) for m in engine.runner.text_model.modules())
    assert max(decode_rows) >= 38 and sum(r in SKINNY_ROWS for r in decode_rows) >= NEW_TOKENS, decode_rows
    lengths = {len(engine_inputs(model, t, ims)[0]) for t, ims in cases.values()}
    assert len(lengths) >= 20, "prompt lengths must vary"
    wrong = {rid: (out[rid], ref) for rid, (text, images) in cases.items()
             if out[rid] != (ref := hf_greedy(model, text, images, NEW_TOKENS))}
    assert not wrong, f"{len(wrong)}/{N} requests differ from HF generate: {wrong}"
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks and not engine.seqs
