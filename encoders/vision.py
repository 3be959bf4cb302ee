"""Vision tower + projector of a checkpoint, batched, one embedding per image.

Life of an image here: the processor (see ``decoders.model.prepare_prompt``) has turned it
into a pixel-input dict; ``VisionEncoder.encode`` groups the dicts that can share one
forward pass, runs the checkpoint's own ``get_image_features`` (so feature layer, CLS
dropping and patch merging are exactly what the checkpoint's forward would do), and
returns one ``ImageEmbedding`` per image, in order: the rows that replace that image's
placeholder tokens in the prompt's input embeddings.

Works with a full or a ``vision_only`` ``LoadedModel``: only the vision parts are touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoders.model import LoadedModel


@dataclass(slots=True)
class ImageEmbedding:
    embeds: torch.Tensor  # [n_placeholder_tokens, text_hidden]
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL only: M-RoPE positions need it
    content_hash: str = ""

    def __post_init__(self):
        if self.embeds.ndim != 2 or self.embeds.shape[0] == 0:
            raise ValueError(f"embeds must be [n_tokens>0, hidden], got {tuple(self.embeds.shape)}")
        if self.grid_thw is not None:
            self.grid_thw = tuple(int(x) for x in self.grid_thw)
            if len(self.grid_thw) != 3 or min(self.grid_thw) <= 0:
                raise ValueError(f"grid_thw must be three positive ints, got {self.grid_thw}")

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


class VisionEncoder:
    def __init__(self, loaded: LoadedModel):
        if loaded.family not in ("llava", "qwen2_vl"):
            raise ValueError(f"{loaded.family!r} checkpoints have no vision tower")
        self.loaded = loaded
        self.model = loaded.model
        self.family = loaded.family

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, pixel_inputs: list[dict[str, torch.Tensor]]) -> list[ImageEmbedding]:
        if not pixel_inputs:
            return []
        with torch.inference_mode():
            if self.family == "qwen2_vl":
                return self._encode_qwen2_vl(pixel_inputs)
            return self._encode_llava(pixel_inputs)

    def _encode_llava(self, pixel_inputs):
        # images of one shape share a forward; each dict holds a [1, C, H, W] batch
        out: list[ImageEmbedding | None] = [None] * len(pixel_inputs)
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(pixel_inputs):
            groups.setdefault(tuple(d["pixel_values"].shape[1:]), []).append(i)
        for idx in groups.values():
            pixels = torch.cat([pixel_inputs[i]["pixel_values"] for i in idx]).to(self.dtype)
            # vision_feature_layer / select strategy default to the checkpoint's config
            feats = self.model.get_image_features(pixel_values=pixels).pooler_output
            for i, f in zip(idx, feats):
                out[i] = ImageEmbedding(embeds=_own(f))
        return out

    def _encode_qwen2_vl(self, pixel_inputs):
        # rows of all images go in one call; cu_seqlens keeps attention within each image
        pixels = torch.cat([d["pixel_values"] for d in pixel_inputs]).to(self.dtype)
        grid = torch.cat([d["image_grid_thw"].reshape(-1, 3) for d in pixel_inputs])
        feats = self.model.get_image_features(pixel_values=pixels, image_grid_thw=grid).pooler_output
        return [ImageEmbedding(embeds=_own(f), grid_thw=tuple(g.tolist())) for f, g in zip(feats, grid)]


def _own(t: torch.Tensor) -> torch.Tensor:
    # outputs are views into one batch tensor: cloning lets each embedding travel (pickle,
    # Ray object store) and be freed on its own instead of dragging the whole batch along
    return t.detach().clone()
