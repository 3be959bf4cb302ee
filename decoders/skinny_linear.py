"""SkinnyLinear: the language model's Linear layers, computed the fast way round for decode batches.

A decode step multiplies a few dozen rows (one per running sequence) by every weight matrix.
`nn.Linear` asks the BLAS for `x @ W.T`; on CPU, MKL's sgemm handles that skinny product far below
its speed for the same product asked as `(W @ x.T).T` (weight as the tall left operand): on the
development machine tiny-llava's 42 decoder GEMMs at 32 rows took 12.4 ms one way and 9.1 ms the
other, while at 1–8 rows and from 56 rows up the plain form is as fast or faster. So `forward`
takes the transposed form only for CPU batches of `SKINNY_ROWS` rows and hands everything else to
`nn.Linear`. (With one thread the two forms run alike; the gap is in how MKL splits the skinny
form over threads.) The two forms agree to rounding — often bit for bit, but not always, depending
on the layer width and thread count — as the same rows computed in a batch of another size do.

`use_skinny_linear(module)` swaps the class of every plain `nn.Linear` under a module in place:
same parameters, same state_dict, same hooks, so the HF modelling code and `generate()` on the
same model object run unchanged (and at one row, the sequential baseline's case, nothing changes).
"""
from __future__ import annotations

import torch
from torch import nn

SKINNY_ROWS = range(16, 49)   # where the transposed form measured faster (see above)


class SkinnyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows not in SKINNY_ROWS or x.device.type != "cpu":
            return super().forward(x)
        out = torch.mm(self.weight, x.reshape(rows, -1).t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)


def use_skinny_linear(module: nn.Module) -> int:
    """Make every plain nn.Linear under `module` a SkinnyLinear; returns how many changed. Idempotent."""
    changed = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = SkinnyLinear
            changed += 1
    return changed
