"""Load a local HF checkpoint, or build one of the tiny built-in presets.

Life of a model here:
1. ``ensure_preset("tiny-llava")`` hashes the preset's recipe and looks for ``cache_dir/tiny-llava-<hash>``.
   If absent it builds one offline and deterministically (seeded init, BPE tokenizer trained in memory on a
   fixed corpus, processor, chat template), ``save_pretrained``s it into a temp dir and renames that into
   place, so a concurrent builder never sees (or leaves) a half-written checkpoint.
2. ``load_model(name_or_path)`` resolves a preset name or a local path, detects the family from
   ``config.model_type`` and loads with ``from_pretrained``. ``vision_only=True`` never materialises
   language-model weights: the model is laid out on the meta device, the LM dropped, and only the vision
   tower + projector rebuilt and filled from the safetensors files.
3. ``prepare_prompt`` applies the chat template, runs the processor (placeholders expanded) and splits
   pixel inputs per image, so encoders and the engine can handle images apart.
The presets have random weights: what they generate is gibberish, by construction.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast,
                          ProcessorMixin, Qwen2VLProcessor)

from decoders.vision_only import VISION_PARTS as _VISION_PARTS
from decoders.vision_only import load_vision_only as _load_vision_only

PRESETS = ("tiny-llava", "tiny-qwen2-vl")
# bench-scale only (`trisect bench memory --model small-llava`), never used by tests: ~3 GB on disk
BENCH_PRESETS = ("small-llava",)
_BUILD_LOCK = threading.Lock()
_BUILDER_VERSION = 1  # bump when the build recipe changes, so old cache dirs are not reused

_TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=4096, rms_norm_eps=1e-6,
             initializer_range=0.1)  # 0.1, not 0.02: greedy outputs vary instead of repeating one token
_SPECS = {
    "tiny-llava": dict(family="llava", text=_TEXT, vision=dict(
        image_size=32, patch_size=8, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, initializer_range=0.1)),  # 32x32 px, 8x8 patches -> 16 image tokens
    "tiny-qwen2-vl": dict(
        family="qwen2_vl",  # mrope_section must sum to head_dim/2 = 512/8/2 = 32
        text=dict(_TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12])),
        vision=dict(depth=3, embed_dim=192, num_heads=4, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, initializer_range=0.1),
        min_pixels=56 * 56, max_pixels=112 * 112),  # 56x56 .. 112x112 px -> 4 .. 16 image tokens
    # LLaVA-1.5's proportions at ~1/10 scale, so the LM dwarfs the vision side as in real models: a
    # CLIP-like tower (224 px, 14 px patches, 256 image tokens) + projector of 43.5 M params against a
    # 729.9 M-param Llama LM (vision 5.6% of weights; llava-1.5-7b: 4.6%). Init 0.02, as real models
    "small-llava": dict(family="llava", text=dict(
        _TEXT, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=4, initializer_range=0.02), vision=dict(
        image_size=224, patch_size=14, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=8, initializer_range=0.02)),
}
_WORDS = """the a an and or but if then when while because of to in on at by for with from about into over under after
cat dog bird fish horse lion bear fox red green blue yellow black white small large big tiny tall short image picture
photo scene sky sea river lake mountain tree forest flower grass road street city house is are was were be has have had
do does can could will would should see look show tell describe find count name read write say think know want like
make one two three four five many few some all every no not left right top bottom near far above below between sun moon
star cloud rain light color shape man woman child people car bus train boat what where who why how this that there""".split()
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # pseudo-words fill the BPE vocab to ~2k

# ChatML for both presets; only the image marker (and llava's leading BOS) differ.
_TEMPLATE = (
    "{prefix}{{% for m in messages %}}<|im_start|>{{{{ m['role'] }}}}\n"
    "{{% if m['content'] is string %}}{{{{ m['content'] }}}}{{% else %}}{{% for c in m['content'] %}}"
    "{{% if c['type'] in ('image', 'image_url') %}}{image}"
    "{{% elif c['type'] == 'text' %}}{{{{ c['text'] }}}}{{% endif %}}{{% endfor %}}{{% endif %}}"
    "<|im_end|>\n{{% endfor %}}{{% if add_generation_prompt %}}<|im_start|>assistant\n{{% endif %}}")


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor minus the video processor (whose base class needs torchvision): ProcessorMixin
    reads ``__init__``'s signature to decide which sub-processors to require, check, save and load."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRISECT_CACHE") or Path.home() / ".cache" / "trisect")


def ensure_preset(name: str, cache_dir: Path | None = None) -> Path:
    if name not in _SPECS:
        raise ValueError(f"unknown preset {name!r}; known: {tuple(_SPECS)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    recipe = [_BUILDER_VERSION, _SPECS[name], _WORDS, _SYLLABLES, _TEMPLATE]  # all that shapes the checkpoint
    final = cache_dir / f"{name}-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]}"
    with _BUILD_LOCK:  # threads would share torch's global RNG, so builds in one process take turns
        if final.is_dir():  # only ever created by the rename below, so it is complete
            return final
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        try:
            _build_preset(name, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is meant to be shared
            try:
                os.rename(tmp, final)  # atomic: readers see no dir or a complete one
            except OSError:
                if not final.is_dir():  # we did not merely lose a race with another process
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def _tokenizer(special: list[str], image_marker: str, bos: str | None, pad: str, **named: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = random.Random(1234)  # fixed corpus: random "sentences" over built-in words and pseudo-words
    words = _WORDS * 6 + ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 3))) for _ in range(1500)]
    corpus = [" ".join(rng.choices(words, k=rng.randint(4, 14))).capitalize() + rng.choice(".?!,")
              for _ in range(4000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # byte-level: any text encodes
    bpe.decoder = decoders.ByteLevel()
    special = [t for t in (bos, pad, "<|im_start|>", "<|im_end|>") if t] + special
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2048, special_tokens=special, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token="<|im_end|>", pad_token=pad,
                                  extra_special_tokens=named)  # named: tok.image_token etc., read by processors
    tok.chat_template = _TEMPLATE.format(prefix="{{ bos_token }}" if bos else "", image=image_marker)
    return tok


def _llava_parts(spec: dict):
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tok = _tokenizer(["<image>"], "<image>\n", bos="<s>", pad="<pad>", image_token="<image>")  # \n: images apart
    v, side = spec["vision"], spec["vision"]["image_size"]
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **spec["text"])
    config = LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=(side // v["patch_size"]) ** 2)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tok, patch_size=v["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tok.chat_template)  # +1: CLS, which "default" drops again
    return LlavaForConditionalGeneration, config, processor


def _qwen2_vl_parts(spec: dict):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
    named = dict(image_token="<|image_pad|>", video_token="<|video_pad|>",
                 vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>")
    tok = _tokenizer(list(named.values()), "<|vision_start|><|image_pad|><|vision_end|>", bos=None,
                     pad="<|endoftext|>", **named)
    ids, v = {k: tok.convert_tokens_to_ids(t) for k, t in named.items()}, spec["vision"]
    text = dict(spec["text"], vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=None)
    config = Qwen2VLConfig(text_config=text, vision_config=dict(v, hidden_size=text["hidden_size"]),
                           image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                           vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"])
    processor = ImageOnlyQwen2VLProcessor(tokenizer=tok, chat_template=tok.chat_template, image_processor=(
        Qwen2VLImageProcessorPil(min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"],
                                 patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                 temporal_patch_size=v["temporal_patch_size"])))
    return Qwen2VLForConditionalGeneration, config, processor


def _build_preset(name: str, out: Path) -> None:
    spec = _SPECS[name]
    model_cls, config, processor = (_llava_parts if spec["family"] == "llava" else _qwen2_vl_parts)(spec)
    with torch.random.fork_rng(devices=[]):  # seed without disturbing the caller's RNG
        torch.manual_seed(0)  # the only source of randomness in the weights
        model = model_cls(config).eval()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id  # <|im_end|> ends a turn
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)  # also writes the tokenizer and chat template
    for f in out.glob("*_config.json"):  # name the stock class, so plain AutoProcessor can read it elsewhere
        f.write_text(f.read_text().replace('"ImageOnlyQwen2VLProcessor"', '"Qwen2VLProcessor"'))


@dataclass(slots=True)
class LoadedModel:
    model: nn.Module  # HF *ForConditionalGeneration / *ForCausalLM in eval(); vision_only: LM parts deleted
    tokenizer: PreTrainedTokenizerBase
    processor: ProcessorMixin | None
    family: str  # "llava" | "qwen2_vl" | "text"
    path: Path
    image_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vision_only: bool = False
    max_model_len: int = 4096

    def __post_init__(self):
        if self.family not in _VISION_PARTS and self.family != "text":
            raise ValueError(f"unknown family {self.family!r}")
        if (self.family == "text") != (self.image_token_id is None):
            raise ValueError("image_token_id is required for multimodal families and absent for text")
        self.path, self.eos_token_ids = Path(self.path), tuple(int(t) for t in self.eos_token_ids)

    def _lm(self) -> nn.Module:
        if self.vision_only:
            raise RuntimeError("this LoadedModel was loaded vision_only: it holds no language model")
        return self.model

    def text_model(self) -> nn.Module:  # (inputs_embeds, attention_mask, position_ids, past_key_values)
        return self._lm().model if self.family == "text" else self._lm().model.language_model

    def lm_head(self) -> nn.Module:
        return self._lm().get_output_embeddings()

    def embed_tokens(self) -> nn.Module:
        return self._lm().get_input_embeddings()


@dataclass(slots=True)
class PreparedPrompt:
    token_ids: list[int]  # chat template applied, one placeholder token per image embedding row
    pixel_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)  # one dict per image, in order

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError("empty prompt")


_FAMILY_OF = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}


def load_model(name_or_path: str, cache_dir=None, dtype=torch.float32, vision_only=False,
               frontend_only=False) -> LoadedModel:
    """frontend_only: tokenizer + processor and no weights at all (what an ingress needs to
    validate and tokenize requests); vision_only: plus the vision tower and projector."""
    path = ensure_preset(name_or_path, cache_dir) if name_or_path in _SPECS else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a preset ({', '.join(_SPECS)}) nor a checkpoint dir")
    config = AutoConfig.from_pretrained(path)
    family = _FAMILY_OF.get(config.model_type) or (
        "text" if type(config) in AutoModelForCausalLM._model_mapping and not hasattr(config, "vision_config") else None)
    if family is None:
        raise ValueError(f"unsupported checkpoint model_type {config.model_type!r}")
    if family == "text":
        if vision_only:
            raise ValueError("vision_only needs a multimodal checkpoint")
        processor, tokenizer = None, AutoTokenizer.from_pretrained(path)
        model = None if frontend_only else AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        # one processor class per family, whatever the checkpoint names (we never process video)
        processor = (ImageOnlyQwen2VLProcessor if family == "qwen2_vl" else AutoProcessor).from_pretrained(path)
        tokenizer = processor.tokenizer
        model = (None if frontend_only else _load_vision_only(path, config, family, dtype) if vision_only
                 else AutoModelForImageTextToText.from_pretrained(path, dtype=dtype))
    try:  # generation_config.json is what generate() stops on; fall back to the model config
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = config.get_text_config().eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos += [tokenizer.eos_token_id] if tokenizer.eos_token_id not in eos + [None] else []
    return LoadedModel(model=model.eval() if model is not None else None, tokenizer=tokenizer, processor=processor,
                       family=family, path=path, image_token_id=None if family == "text" else config.image_token_id,
                       eos_token_ids=tuple(eos), vision_only=vision_only or frontend_only,
                       max_model_len=getattr(config.get_text_config(), "max_position_embeddings", 4096))


def prepare_prompt(loaded: LoadedModel, text: str, images: list) -> PreparedPrompt:
    images = list(images or [])
    if loaded.family == "text":
        if images:
            raise ValueError("this model is text-only: images are not accepted")
        tok = loaded.tokenizer
        if not tok.chat_template:  # plain LM without a template: the text is the prompt
            return PreparedPrompt(token_ids=tok(text)["input_ids"])
        return PreparedPrompt(token_ids=list(tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)))
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = loaded.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
    enc = loaded.processor(text=[prompt], images=images or None, return_tensors="pt")
    if not images:
        pixels = []
    elif loaded.family == "llava":  # [1, C, H, W] each; clone so no image pins the whole batch
        pixels = [{"pixel_values": enc["pixel_values"][i:i + 1].clone()} for i in range(len(images))]
    else:  # Qwen2-VL: pixel_values rows are patches, image after image, grid_thw[i].prod() rows each
        grid = enc["image_grid_thw"]
        chunks = torch.split(enc["pixel_values"], grid.prod(-1).tolist())
        pixels = [{"pixel_values": c.clone(), "image_grid_thw": grid[i:i + 1].clone()} for i, c in enumerate(chunks)]
    return PreparedPrompt(token_ids=enc["input_ids"][0].tolist(), pixel_inputs=pixels)
