"""SkinnyLinear computes what nn.Linear computes, on the same parameters, whichever form it takes."""
import torch
from torch import nn

from decoders.skinny_linear import SKINNY_ROWS, SkinnyLinear, use_skinny_linear


def _pair(in_f, out_f, bias):
    torch.manual_seed(0)
    plain = nn.Linear(in_f, out_f, bias=bias)
    skinny = nn.Linear(in_f, out_f, bias=bias)
    skinny.load_state_dict(plain.state_dict())
    assert use_skinny_linear(skinny) == 1 and type(skinny) is SkinnyLinear
    return plain, skinny


def test_decode_shaped_batches_match_nn_linear():
    for bias in (False, True):
        plain, skinny = _pair(512, 1408, bias)
        for rows in (1, 8, SKINNY_ROWS.start, 32, SKINNY_ROWS.stop - 1, SKINNY_ROWS.stop, 200):
            x = torch.randn(rows, 1, 512)
            want, got = plain(x), skinny(x)
            assert got.shape == want.shape == (rows, 1, 1408) and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if rows not in SKINNY_ROWS:
                assert torch.equal(got, want), "outside the skinny range it must be nn.Linear itself"


def test_swap_keeps_parameters_and_skips_subclasses():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Sequential(nn.Linear(4, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert use_skinny_linear(model) == 2
    assert use_skinny_linear(model) == 0, "idempotent"
    assert type(model[1]) is Custom
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
