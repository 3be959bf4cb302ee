"""The oracle is independent: the HF reference never runs on a model an engine has touched."""
import pytest
from torch import nn

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.skinny_linear import SkinnyLinear
from tests.reference import assert_independent, hf_greedy, reference_model


def test_reference_model_holds_no_trisect_code_after_an_engine_patched_the_shared_one(tiny_llava, monkeypatch):
    Engine(tiny_llava, EngineConfig(num_kv_blocks=8))               # swaps the shared model's Linears
    assert any(isinstance(m, SkinnyLinear) for m in tiny_llava.model.modules())
    with pytest.raises(AssertionError, match="SkinnyLinear"):
        assert_independent(tiny_llava.model)                        # the check sees what engines do

    ref = reference_model(tiny_llava)
    assert ref is not tiny_llava.model
    assert_independent(ref)
    assert not any(isinstance(m, SkinnyLinear) for m in ref.modules())
    shared = {p.data_ptr() for p in tiny_llava.model.parameters()}
    assert not shared & {p.data_ptr() for p in ref.parameters()}, "the reference shares weights"

    # the reference is computed without ever calling the shared model
    def broken(*a, **k):
        raise AssertionError("the reference ran through the engine's model")
    monkeypatch.setattr(tiny_llava.model, "forward", broken)
    assert len(hf_greedy(tiny_llava, "an oracle of its own", [], 4)) == 4


def test_assert_independent_catches_a_patched_forward_and_a_trisect_hook():
    patched = nn.Sequential(nn.Linear(2, 2))
    patched[0].forward = lambda x: x
    with pytest.raises(AssertionError, match="patched forward"):
        assert_independent(patched)
    hooked = nn.Sequential(nn.Linear(2, 2))
    from decoders import skinny_linear
    hooked[0].register_forward_hook(lambda *a: None)
    assert_independent(hooked)                                     # a hook of nobody's: fine
    hooked[0].register_forward_pre_hook(skinny_linear.use_skinny_linear)
    with pytest.raises(AssertionError, match="hook"):
        assert_independent(hooked)
