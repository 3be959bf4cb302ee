"""Engine ≡ HF generate() at the batch sizes users reach, with two hostile requests in the batch.

40 concurrent requests (36 start together, 4 join one per step while the others decode), so the
decode steps run 32–40 rows — the range where SkinnyLinear takes its transposed GEMM
(`SKINNY_ROWS`) — each compared with the independent reference (tests/reference.py). Two of them
are hostile: one asks for temperature 1e-40 (dividing logits by it overflows: it must be greedy and
token-exact), one carries a stop condition that raises when the engine checks it (it must fail
alone, finish_reason "error", with an error naming it; the other 39 must not notice).
Qwen2-VL (M-RoPE, dynamic image tokens) runs here; Llava gets the same batch over the real HTTP
front door in tests/integration/test_api_batch_exact.py. Few new tokens keep it short: what is
tested is the batch shape, not the length.
"""
import pytest

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.sampling import SamplingParams
from decoders.skinny_linear import SKINNY_ROWS, SkinnyLinear
from tests.reference import engine_inputs, greedy, hf_greedy, mixed_batch

N, NEW_TOKENS = 40, 6
COLD, RAISING = "b05", "b17"            # the near-zero temperature one, the one whose stop check raises


class UncheckableStop(str):
    """A stop string the engine cannot measure: `len()` raises, as any bug in a stop check would."""

    def __len__(self):
        raise LookupError("this stop string cannot be checked")


@pytest.mark.slow
def test_forty_concurrent_requests_are_token_exact_beside_hostile_ones(tiny_qwen2_vl, make_image):
    model = tiny_qwen2_vl
    cases = mixed_batch(N, make_image)
    engine = Engine(model, EngineConfig(block_size=16, max_num_seqs=48, max_num_batched_tokens=4096))
    decode_rows = []
    run = engine.runner.run
    engine.runner.run = lambda batch: decode_rows.append(sum(n == 1 for _, n in batch)) or run(batch)
    inputs = {rid: engine_inputs(model, text, images) for rid, (text, images) in cases.items()}
    join_at = {}
    for i, (rid, (ids, embeds)) in enumerate(inputs.items()):
        params = greedy(NEW_TOKENS)
        if rid == COLD:
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1e-40, ignore_eos=True)
        if rid == RAISING:
            params.stop = (UncheckableStop("never"),)
        join_at.setdefault(max(0, i - 35), []).append((rid, ids, params, embeds))

    outputs, errors = {}, {}
    step = 0
    while engine.has_unfinished() or join_at:
        for args in join_at.pop(step, []):
            engine.add_request(*args)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason == "error":
                errors[out.request_id] = out.error
        step += 1

    assert any(isinstance(m, SkinnyLinear) for m in engine.runner.text_model.modules())
    wide = [r for r in decode_rows if r in SKINNY_ROWS and r >= 32]
    assert len(wide) >= NEW_TOKENS - 2 and max(decode_rows) <= 48, decode_rows
    assert len({len(ids) for ids, _ in inputs.values()}) >= 20, "prompt lengths must vary"
    assert sum(bool(ims) for _, ims in cases.values()) >= 10, "images in the batch"

    assert set(errors) == {RAISING}, errors
    assert isinstance(errors[RAISING], RuntimeError) and RAISING in str(errors[RAISING])
    assert "LookupError" in str(errors[RAISING]) and outputs.get(RAISING, []) == []
    wrong = {rid: (outputs[rid], ref) for rid, (text, images) in cases.items()
             if rid != RAISING and outputs[rid] != (ref := hf_greedy(model, text, images, NEW_TOKENS))}
    assert not wrong, f"{len(wrong)}/{N - 1} requests differ from HF generate: {wrong}"
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks and not engine.seqs

