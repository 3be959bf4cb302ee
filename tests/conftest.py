"""Shared fixtures: the two tiny presets (built once per session) and deterministic images.

Presets are built into ``$TRISECT_CACHE`` when set (reuse across runs), else into a
session temp dir, so a test run never writes to the user's real cache by surprise.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A deterministic random RGB image of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(name="make_image")
def _make_image_fixture():
    return make_image


@pytest.fixture(scope="session")
def trisect_cache(tmp_path_factory) -> Path:
    env = os.environ.get("TRISECT_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("trisect-cache")


@pytest.fixture(scope="session")
def tiny_llava(trisect_cache):
    from decoders.model import load_model
    return load_model("tiny-llava", cache_dir=trisect_cache)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(trisect_cache):
    from decoders.model import load_model
    return load_model("tiny-qwen2-vl", cache_dir=trisect_cache)
