"""Model names users can give: size presets (random init, saved and re-loaded through
`from_pretrained`), the real-encoder stack, or a local directory of real weights.

    tiny          Qwen2-VL architecture, a few layers: tests and the CPU demo
    7b-shape      Qwen2-VL-7B's shapes with random bf16 weights: GPU benchmarks (shapes decide speed);
                  built in memory on the target device (16 GB of random weights are not worth a
                  save/load round trip)
    dino-smollm2  real DINOv2-small patches -> projector -> real SmolLM2-135M (pip-installed weights)
    /a/path       a transformers checkpoint (Qwen2-VL / Qwen2.5-VL), loaded offline

Nothing here downloads: presets are built from configs and cached under $MOSAIC_RAY_CACHE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mosaic_ray.model.adapter import ModelAdapter

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

PRESETS = {
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        frame_size=56, dtype="float32",
    ),
    "7b-shape": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
        frame_size=336, dtype="bfloat16",
    ),
}
MODEL_NAMES = tuple(PRESETS) + ("dino-smollm2",)


def cache_dir() -> Path:
    return Path(os.environ.get("MOSAIC_RAY_CACHE", Path.home() / ".cache" / "mosaic_ray"))


def build_byte_tokenizer():
    """A byte-level tokenizer with Qwen2-VL's special tokens (random-init presets have no vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _preset_config(name: str, tokenizer):
    from transformers import Qwen2VLConfig

    p = PRESETS[name]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = max(len(tokenizer), 64)
    return Qwen2VLConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=1 << 20, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **p["text"]),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **p["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def materialize_preset(name: str, seed: int = 0) -> Path:
    """Save a random-init preset once as a transformers directory; later loads use from_pretrained."""
    from transformers import Qwen2VLForConditionalGeneration

    path = cache_dir() / "presets" / f"{name}-seed{seed}"
    if (path / "config.json").exists():
        return path
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(MODEL_NAMES)} or a local path")
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(_preset_config(name, tokenizer))
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "mosaic_ray.json").write_text(json.dumps({"preset": name, "frame_size": PRESETS[name]["frame_size"]}))
    tmp.rename(path)
    return path


def load_model(name_or_path: str, device: str | torch.device = "cpu", dtype: str | None = None,
               frame_size: int | None = None, seed: int = 0) -> ModelAdapter:
    """Resolve a model name or local directory into a ready ModelAdapter."""
    from transformers import AutoTokenizer

    if name_or_path == "dino-smollm2":
        from mosaic_ray.model.dino_smollm2 import load_dino_smollm2

        return load_dino_smollm2(device=device, frame_size=frame_size or 224)
    if name_or_path == "7b-shape" and not Path(name_or_path).exists():
        return build_in_memory(name_or_path, device, dtype, frame_size, seed)
    if name_or_path in PRESETS and not Path(name_or_path).exists():
        path = materialize_preset(name_or_path, seed)
        dtype = dtype or PRESETS[name_or_path]["dtype"]
    else:
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model {name_or_path!r}: not a preset ({', '.join(MODEL_NAMES)}) and not a directory with config.json"
            )
    meta = json.loads((path / "mosaic_ray.json").read_text()) if (path / "mosaic_ray.json").exists() else {}
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    torch_dtype = getattr(torch, dtype) if dtype else None
    try:
        if model_type == "qwen2_vl":
            from transformers import Qwen2VLForConditionalGeneration as cls
        elif model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as cls
        else:
            raise ValueError(f"model {path}: unsupported model_type {model_type!r} (qwen2_vl, qwen2_5_vl)")
        model = cls.from_pretrained(path, dtype=torch_dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, KeyError) as err:
        raise ValueError(f"model {path}: cannot load weights or tokenizer: {err}") from err
    from mosaic_ray.model.qwen2_vl import Qwen2VLAdapter

    return Qwen2VLAdapter(model, tokenizer, device, frame_size=frame_size or meta.get("frame_size", 336))


def build_in_memory(name: str, device, dtype: str | None = None, frame_size: int | None = None, seed: int = 0) -> ModelAdapter:
    """A random-init preset constructed directly on `device` (no disk round trip)."""
    from transformers import Qwen2VLForConditionalGeneration

    from mosaic_ray.model.qwen2_vl import Qwen2VLAdapter

    tokenizer = build_byte_tokenizer()
    torch_dtype = getattr(torch, dtype or PRESETS[name]["dtype"])
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(_preset_config(name, tokenizer))
    finally:
        torch.set_default_dtype(previous)
    return Qwen2VLAdapter(model.to(torch_dtype), tokenizer, device, frame_size=frame_size or PRESETS[name]["frame_size"])
