"""The vision tower's fast path for stream frames: patches made on the device, attention in one call.

transformers' Qwen2-VL image processor works on the host in numpy, one frame at a time, and the
vision tower's SDPA path runs one attention call per frame per layer; at 16-32 frames a batch
those two were most of the ingest time on an H100 (scratch profile: ~8 ms per frame of host
preprocessing, ~1000 small attention launches per batch). Both are replaced here, keeping the
model's numbers:

- `FramePatcher`: frames already at the processor's target size (the usual case: streams are
  decoded at `frame_size`) are rescaled, normalized and cut into the processor's patch layout with
  torch on the device; other frames return None and go through the processor.
- `packed_vision_attention`: registered under a name containing "flash", so the vision tower
  hands it the packed sequence with `cu_seq_lens`; when every frame has the same number of
  patches it is one batched SDPA call, otherwise one call per frame like transformers'.
- `VisionInputs`: the tower's cumulative lengths, longest frame and rotary position ids, which
  transformers derives from a device copy of the grid with ~7 host syncs per batch, made on the
  host from the host grid (transformers' own helpers) and copied without a sync, once per grid.
- `fuse_vision_elementwise`: on CUDA, the tower's QuickGELU and its rotary each one kernel
  (`kernels/vision_elementwise.py`) instead of chains of ~3 and ~14 launches over the packed patches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from mosaic_ray.kernels.vision_elementwise import quick_gelu, rotary_vision
from mosaic_ray.transfer import to_device

# "flash" in the name makes Qwen2-VL's VisionAttention pass the packed sequence and cu_seqlens.
VISION_ATTENTION = "mosaic_flash_packed"


def packed_vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query/key/value [1, H, N, D] packed frames; returns ([1, N, H, D], None). Non-causal."""
    _, H, N, D = query.shape
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    frames = cu_seq_lens_q.numel() - 1
    n = int(max_length_q) if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    if n * frames == N:  # every frame the same length (the max times the count is the total)
        q, k, v = (t[0].view(H, frames, n, D).transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # [frames, H, n, D]
        return out.transpose(1, 2).reshape(1, N, H, D), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    outs = [F.scaled_dot_product_attention(q, k, v, scale=scaling)
            for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


AttentionInterface.register(VISION_ATTENTION, packed_vision_attention)


class FusedQuickGELU(torch.nn.Module):
    """transformers' `QuickGELUActivation` (x * sigmoid(1.702 x)) in one kernel on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x) if x.is_cuda else x * torch.sigmoid(1.702 * x)


def _fused_rotary(original):
    def apply_rotary_pos_emb_vision(q, k, cos, sin):
        if q.is_cuda and q.dim() == 3 and cos.dim() == 2 and q.stride(-1) == 1 and k.stride(-1) == 1:
            return rotary_vision(q, k, cos.contiguous(), sin.contiguous())
        return original(q, k, cos, sin)

    apply_rotary_pos_emb_vision.mosaic_fused = True
    apply_rotary_pos_emb_vision.original = original
    return apply_rotary_pos_emb_vision


def fuse_vision_elementwise(model) -> int:
    """Swap the vision tower's elementwise chains for fused kernels where they run on CUDA: each
    block's QuickGELU becomes a `FusedQuickGELU` (this model's modules only), and the Qwen2-VL /
    Qwen2.5-VL modules' `apply_rotary_pos_emb_vision`, which their vision attention looks up at
    call time, a wrapper that takes the kernel for CUDA tensors and transformers' function
    otherwise (process-wide, but the same fp32 math: see the kernels' tests). Idempotent; returns
    the modules changed."""
    from transformers.activations import QuickGELUActivation

    changed = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuickGELUActivation) and ".visual." in f".{name}.":
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], FusedQuickGELU())
            changed += 1
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    for mod in (modeling_qwen2_vl, modeling_qwen2_5_vl):
        fn = getattr(mod, "apply_rotary_pos_emb_vision", None)
        if fn is not None and not getattr(fn, "mosaic_fused", False):
            mod.apply_rotary_pos_emb_vision = _fused_rotary(fn)
            changed += 1
    return changed


class FramePatcher:
    """The processor's rescale + normalize + patchify, in torch, for frames that need no resize."""

    def __init__(self, processor) -> None:
        p = processor
        self.patch, self.merge, self.temporal = p.patch_size, p.merge_size, p.temporal_patch_size
        self.min_pixels, self.max_pixels = p.size["shortest_edge"], p.size["longest_edge"]
        self.scale = float(p.rescale_factor) if p.do_rescale else 1.0
        mean = torch.tensor(p.image_mean if p.do_normalize else [0.0] * 3, dtype=torch.float32)
        std = torch.tensor(p.image_std if p.do_normalize else [1.0] * 3, dtype=torch.float32)
        self._mean_std = {torch.device("cpu"): (mean[:, None, None], std[:, None, None])}  # per device, [C, 1, 1]

    def _normalizer(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std [C, 1, 1] on `device`, copied there once (not on every call)."""
        if device not in self._mean_std:
            mean, std = self._mean_std[torch.device("cpu")]
            self._mean_std[device] = (mean.to(device), std.to(device))
        return self._mean_std[device]

    def applies(self, frames: list[np.ndarray]) -> bool:
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            return False
        h, w, c = next(iter(shapes))
        return c == 3 and smart_resize(h, w, self.patch * self.merge, self.min_pixels, self.max_pixels) == (h, w)

    def __call__(self, frames: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB uint8 frames [H, W, 3] (all one size, see `applies`) -> (pixel_values, image_grid_thw)."""
        x = torch.from_numpy(np.stack(frames)).to(device, non_blocking=True)  # [B, H, W, 3] uint8
        B, H, W, C = x.shape
        mean, std = self._normalizer(x.device)
        # rescale in float64 then normalize in float32: bit-identical to the processor's numpy path
        x = ((x.permute(0, 3, 1, 2).double() * self.scale).float() - mean) / std
        ps, m = self.patch, self.merge
        gh, gw = H // ps, W // ps
        x = x.reshape(B, C, gh // m, m, ps, gw // m, m, ps).permute(0, 2, 5, 3, 6, 1, 4, 7)  # B gh gw mh mw C ph pw
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], self.temporal, ps, ps)
        pixels = x.reshape(B * gh * gw, C * self.temporal * ps * ps)
        grid = torch.tensor([[1, gh, gw]] * B, dtype=torch.int64)
        return pixels, grid


class VisionInputs:
    """kwargs for the vision tower's forward (`cu_seqlens`, `max_seqlen`, `position_ids`) from a
    host grid [B, 3]; transformers pops them instead of deriving them from the grid. Kept for the
    last few grids (a stream's frames are all one size, so a batch's grid repeats)."""

    def __init__(self, merge_size: int, keep: int = 16) -> None:
        self.merge, self.keep = merge_size, keep
        self._made: dict[tuple, dict] = {}

    def __call__(self, grid: torch.Tensor, device: torch.device) -> dict:
        key = (str(device), tuple(map(tuple, grid.tolist())))  # a host tensor: no sync
        if key not in self._made:
            if len(self._made) >= self.keep:
                self._made.pop(next(iter(self._made)))
            cu = get_vision_cu_seqlens(grid)
            self._made[key] = {"cu_seqlens": to_device(cu, device), "max_seqlen": int((cu[1:] - cu[:-1]).max()),
                               "position_ids": to_device(get_vision_position_ids(grid, self.merge), device)}
        return dict(self._made[key])
