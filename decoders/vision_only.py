"""The vision tower + projector of a multimodal checkpoint, and nothing of its language model:
what an encode replica loads (`load_model(..., vision_only=True)`).

The model is laid out on the meta device, the LM dropped, the vision parts rebuilt on CPU and filled
from the safetensors files tensor by tensor — so the process never holds LM weights, and at peak
holds the vision weights once.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForImageTextToText

# vision submodules of model.model per family, and legacy (pre-5.x) checkpoint key prefixes
VISION_PARTS = {"llava": ("vision_tower", "multi_modal_projector"), "qwen2_vl": ("visual",)}
_LEGACY_PREFIX = {"llava": {"vision_tower.": "model.vision_tower.",
                            "multi_modal_projector.": "model.multi_modal_projector."},
                  "qwen2_vl": {"visual.": "model.visual."}}


def load_vision_only(path: Path, config, family: str, dtype) -> nn.Module:
    with torch.device("meta"):  # lays out the whole model without allocating a byte
        model = AutoModelForImageTextToText._model_mapping[type(config)](config)
    del model.model.language_model, model.lm_head
    for name in VISION_PARTS[family]:
        # rebuild for real on CPU: non-persistent buffers (rotary inv_freq, CLIP position_ids)
        # are computed at construction and are not in the checkpoint
        cls = type(getattr(model.model, name))
        real = cls(config) if name == "multi_modal_projector" else cls._from_config(config.vision_config)
        setattr(model.model, name, real)
    # Copy each tensor straight into its parameter (state_dict() entries share their storage), and
    # map the file for one tensor at a time: safetensors reads through mmap, and every page read
    # stays in this process's RSS until the file is closed — the whole tower, twice, at peak
    wanted, found = model.state_dict(), set()
    for file in sorted(path.glob("*.safetensors")):  # one file or the shards of a big checkpoint
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            new = next((n + key[len(o):] for o, n in _LEGACY_PREFIX[family].items() if key.startswith(o)), key)
            if new in wanted:
                with safe_open(str(file), framework="pt") as f:
                    tensor = f.get_tensor(key)
                    if tensor.shape != wanted[new].shape:  # copy_ would broadcast some mismatches
                        raise ValueError(f"{path}: {key} is {list(tensor.shape)}, the model wants "
                                         f"{list(wanted[new].shape)}")
                    wanted[new].copy_(tensor)
                found.add(new)
    if missing := sorted(set(wanted) - found):
        raise ValueError(f"{path}: vision weights missing from checkpoint: {missing[:5]}")
    return model.to(dtype).eval()
