"""`trisect bench engine` times HF generate() on a model no engine touched, and checks trisect's
tokens against it."""
from decoders.skinny_linear import SkinnyLinear
from services.bench.engine import bench, load_baseline
from tests.reference import assert_independent


def test_bench_baselines_run_on_their_own_untouched_model(tiny_llava):
    baseline = load_baseline(tiny_llava)
    assert baseline is not tiny_llava.model
    assert not {p.data_ptr() for p in baseline.parameters()} & {p.data_ptr() for p in tiny_llava.model.parameters()}
    r = bench(tiny_llava, baseline, batch=2, prompt_len=8, new_tokens=3, repeats=1)
    assert r["tokens_identical_to_hf"] and r["trisect_tok_s"] > 0 and r["hf_batched_tok_s"] > 0
    assert any(isinstance(m, SkinnyLinear) for m in tiny_llava.model.modules())   # the engine's, patched
    assert_independent(baseline)                                                  # HF's, untouched
