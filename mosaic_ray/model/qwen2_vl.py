"""Qwen2-VL / Qwen2.5-VL through transformers' own classes.

Frames are fed as single images (grid t = 1), each wrapped as
`<|vision_start|> <|image_pad|> x n <|vision_end|>`; positions follow the model's M-RoPE rule
(`get_vision_position_ids`), so a stream fed frame by frame gets exactly the positions that
`get_rope_index` gives the whole sequence (checked by the engine's exactness test).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mosaic_ray.config import KVLayout
from mosaic_ray.model.adapter import Chunk, ModelAdapter
from mosaic_ray.model.attention import ATTENTION_NAME
from mosaic_ray.model.vision_fast import VISION_ATTENTION, FramePatcher, VisionInputs, fuse_vision_elementwise


class Qwen2VLAdapter(ModelAdapter):
    name = "qwen2-vl"

    def __init__(self, model, tokenizer, device, frame_size: int = 336) -> None:
        super().__init__(model, tokenizer, device, frame_size)
        side = frame_size * frame_size
        self.processor = Qwen2VLImageProcessorPil(min_pixels=side, max_pixels=side)
        self.patcher = FramePatcher(self.processor)
        # the vision tower gets the packed frames in one attention call per layer (vision_fast.py)
        model.set_attn_implementation({"text_config": ATTENTION_NAME, "vision_config": VISION_ATTENTION})
        fuse_vision_elementwise(model)  # QuickGELU and rotary one kernel each on CUDA
        cfg = model.config
        self.text_config = cfg.text_config
        self.merge = cfg.vision_config.spatial_merge_size
        # Qwen2-VL's tower reads the grid only for these; Qwen2.5-VL's also for its window index
        self.vision_inputs = VisionInputs(self.merge) if cfg.model_type == "qwen2_vl" else None
        self.image_token_id = cfg.image_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.vision_end_id = cfg.vision_end_token_id
        tc = self.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self._layout = KVLayout(tc.num_hidden_layers, tc.num_key_value_heads, head_dim, model.dtype, pos_dims=3)

    def embedding(self):
        return self.model.model.language_model.embed_tokens

    def decoder(self):
        return self.model.model.language_model

    def lm_head(self):
        return self.model.lm_head

    def preprocess(self, frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> (pixel_values, image_grid_thw) exactly as the model's image processor makes them
        (on the device when the frames need no resize, see `FramePatcher`)."""
        if self.patcher.applies(frames):
            return self.patcher(frames, self.device)
        out = self.processor(images=list(frames), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    @torch.no_grad()
    def encode_frames(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        pixels, grid = self.preprocess(frames)
        if self.vision_inputs is not None:  # the host grid, and what the tower derives from it: no host sync
            feats = self.model.model.get_image_features(pixels.to(self.device), grid,
                                                        **self.vision_inputs(grid, self.device)).pooler_output
        else:
            feats = self.model.model.get_image_features(pixels.to(self.device), grid.to(self.device)).pooler_output
        self._last_grid = grid
        return [(f, g) for f, g in zip(feats, grid)]

    def frame_chunk(self, features, timestamp: float) -> Chunk:
        feats, grid = features
        n = feats.shape[0]
        vis_pos = self.model.model.get_vision_position_ids(1, grid, 1, self.merge, device=self.device)
        end = 1 + max(int(grid[1]), int(grid[2])) // self.merge
        pos = torch.cat([torch.zeros(3, 1, dtype=torch.long, device=self.device), vis_pos,
                         torch.full((3, 1), end, dtype=torch.long, device=self.device)], 1)
        start = self.embed_ids([self.vision_start_id])
        stop = self.embed_ids([self.vision_end_id])
        embeds = torch.cat([start, feats.to(start.dtype), stop], 0)
        ids = torch.tensor([self.vision_start_id] + [self.image_token_id] * n + [self.vision_end_id])
        return Chunk(embeds, pos, end + 1, ids)

    def prefix_text(self) -> str:
        return "<|im_start|>system\nYou watch a live video stream.<|im_end|>\n"
