"""GPU-only (skipped on CPU): the vision tower with its fused elementwise kernels gives the
features transformers' own elementwise code gives."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fused_tower_equals_transformers_tower():
    from transformers.activations import QuickGELUActivation
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from mosaic_ray.model.registry import load_model
    from mosaic_ray.model.vision_fast import FusedQuickGELU

    adapter = load_model("tiny", "cuda")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (adapter.frame_size, adapter.frame_size, 3), dtype=np.uint8) for _ in range(5)]
    fused = [f for f, _ in adapter.encode_frames(frames)]
    fn = modeling_qwen2_vl.apply_rotary_pos_emb_vision
    swapped = []
    for name, m in list(adapter.model.named_modules()):
        if isinstance(m, FusedQuickGELU):
            parent, leaf = name.rsplit(".", 1)
            setattr(adapter.model.get_submodule(parent), leaf, QuickGELUActivation())
            swapped.append((parent, leaf))
    modeling_qwen2_vl.apply_rotary_pos_emb_vision = fn.original
    try:
        plain = [f for f, _ in adapter.encode_frames(frames)]
    finally:
        modeling_qwen2_vl.apply_rotary_pos_emb_vision = fn
        for parent, leaf in swapped:
            setattr(adapter.model.get_submodule(parent), leaf, FusedQuickGELU())
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
