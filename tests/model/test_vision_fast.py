"""The vision fast path against transformers' own: bit-identical patches, the same attention."""

import numpy as np
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mosaic_ray.model.registry import load_model
from mosaic_ray.model.vision_fast import FramePatcher, packed_vision_attention


@pytest.fixture(scope="module")
def adapter():
    return load_model("tiny", "cpu")


def _frames(n, side, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def test_patches_bit_identical_to_processor(adapter):
    frames = _frames(3, adapter.frame_size)
    patcher = FramePatcher(adapter.processor)
    assert patcher.applies(frames)
    pixels, grid = patcher(frames, torch.device("cpu"))
    ref = adapter.processor(images=frames, return_tensors="pt")
    assert torch.equal(pixels, ref["pixel_values"])
    assert torch.equal(grid, ref["image_grid_thw"])


def test_frames_needing_resize_go_to_processor(adapter):
    patcher = FramePatcher(adapter.processor)
    assert not patcher.applies(_frames(1, adapter.frame_size + 7))
    assert not patcher.applies(_frames(1, adapter.frame_size) + _frames(1, adapter.frame_size * 2))
    pixels, _ = adapter.preprocess(_frames(2, adapter.frame_size + 7))  # the processor's path
    assert pixels.shape[0] > 0


@pytest.mark.parametrize("lengths", [[16, 16, 16], [16, 4, 9]])
def test_packed_attention_matches_per_frame_sdpa(lengths):
    torch.manual_seed(0)
    H, D, N = 2, 8, sum(lengths)
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    out, _ = packed_vision_attention(None, q, k, v, scaling=D**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths))
    module = torch.nn.Module()
    module.is_causal = False
    ref = torch.cat([sdpa_attention_forward(module, *(t.split(lengths, 2)[i] for t in (q, k, v)), None,
                                            scaling=D**-0.5)[0] for i in range(len(lengths))], 1)
    assert out.shape == (1, N, H, D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_vision_features_unchanged(adapter):
    """The adapter's encode path (fast patches + packed attention) equals the processor + SDPA path."""
    frames = _frames(3, adapter.frame_size, seed=1)
    feats = adapter.encode_frames(frames)
    ref = adapter.processor(images=frames, return_tensors="pt")
    model = adapter.model
    model.set_attn_implementation({"vision_config": "sdpa"})
    try:
        want = model.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"]).pooler_output
    finally:
        model.set_attn_implementation({"vision_config": "mosaic_flash_packed"})
    for (got, _), w in zip(feats, want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def test_vision_inputs_give_the_towers_own_features(adapter):
    """The lengths and positions made on the host from the host grid are what the tower derives
    itself: the same features, frames of two sizes in one batch included."""
    from mosaic_ray.model.vision_fast import VisionInputs

    inputs = VisionInputs(adapter.merge, keep=2)
    visual = adapter.model.model
    for sides in ([adapter.frame_size] * 3, [adapter.frame_size, adapter.frame_size * 2]):
        frames = [f for s in sides for f in _frames(1, s, seed=s)]
        out = adapter.processor(images=frames, return_tensors="pt")
        pixels, grid = out["pixel_values"], out["image_grid_thw"]
        with torch.no_grad():
            ref = visual.get_image_features(pixels, grid.clone()).pooler_output
            got = visual.get_image_features(pixels, grid, **inputs(grid, torch.device("cpu"))).pooler_output
        assert len(got) == len(ref) == len(frames)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    assert len(inputs._made) == 2


def test_fused_elementwise_is_wired_in(adapter):
    """Every QuickGELU of the tower is the fused module and the rotary the fused wrapper; on the
    CPU both take transformers' own math (the GPU path is checked in tests/gpu)."""
    from transformers.activations import QuickGELUActivation
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from mosaic_ray.model.vision_fast import FusedQuickGELU, fuse_vision_elementwise

    visual = adapter.model.model.visual
    acts = [m for m in visual.modules() if isinstance(m, (FusedQuickGELU, QuickGELUActivation))]
    if adapter.model.config.vision_config.hidden_act == "quick_gelu":
        assert acts and all(isinstance(m, FusedQuickGELU) for m in acts)
    assert modeling_qwen2_vl.apply_rotary_pos_emb_vision.mosaic_fused
    assert fuse_vision_elementwise(adapter.model) == 0  # idempotent
    x = torch.randn(5, 7)
    torch.testing.assert_close(FusedQuickGELU()(x), QuickGELUActivation()(x))
