"""The real-encoder stack (pip-installed DINOv2-small and SmolLM2-135M weights), registered as `dino-smollm2`:

    real video frame -> DINOv2-small patches (224 px: 16 x 16 x 384) -> 2 x 2 average pool (64 tokens)
    -> fixed random projector (seeded, scaled to the embedding table's RMS) -> SmolLM2-135M-Instruct

Both networks are real weights installed by pip; the projector is untrained, so answers read the
stream's text (captions, earlier answers) fluently but are blind to the pixels. Keys in the cache
come from real features of real video, which is what retrieval fidelity needs (random weights give keys with no structure to retrieve by).
"""

from __future__ import annotations

import numpy as np
import torch

from mosaic_ray.config import KVLayout
from mosaic_ray.model.adapter import Chunk, ModelAdapter

PROJECTOR_SEED = 1234


class DinoSmolAdapter(ModelAdapter):
    name = "dino-smollm2"

    def __init__(self, llm, tokenizer, vision, device, frame_size: int = 224, pool: int = 2) -> None:
        super().__init__(llm, tokenizer, device, frame_size)
        self.vision = vision.to(device).eval()
        self.pool = pool
        hidden = llm.config.hidden_size
        g = torch.Generator().manual_seed(PROJECTOR_SEED)
        w = torch.randn(hidden, vision.config.hidden_size, generator=g) / vision.config.hidden_size**0.5
        emb_rms = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
        self.projector = (w * emb_rms).to(device, llm.dtype)
        c = llm.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self._layout = KVLayout(c.num_hidden_layers, c.num_key_value_heads, head_dim, llm.dtype, pos_dims=1)

    def embedding(self):
        return self.model.model.embed_tokens

    def decoder(self):
        return self.model.model

    def lm_head(self):
        return self.model.lm_head

    @torch.no_grad()
    def encode_frames(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        from mosaic_ray.model.real_weights import dinov2_preprocess

        x = dinov2_preprocess(frames, self.frame_size).to(self.device, self.vision.dtype)
        patches = self.vision(pixel_values=x).last_hidden_state[:, 1:]  # drop CLS
        N, T, C = patches.shape
        side = int(T**0.5)
        grid = patches.reshape(N, side, side, C).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # [N, n, C]
        feats = pooled.to(self.projector.dtype) @ self.projector.T
        return list(feats)

    def frame_chunk(self, features: torch.Tensor, timestamp: float) -> Chunk:
        n = features.shape[0]
        pos = torch.arange(n, device=self.device)[None]
        return Chunk(features, pos, n, torch.full((n,), -1, dtype=torch.long))

    def prefix_text(self) -> str:
        return ("<|im_start|>system\nYou watch a live video stream. Timestamped captions describe it. "
                "Answer briefly from them.<|im_end|>\n")


def load_dino_smollm2(device="cpu", frame_size: int = 224) -> DinoSmolAdapter:
    from mosaic_ray.model.real_weights import load_dinov2_small, load_smollm2

    llm, tokenizer = load_smollm2()
    return DinoSmolAdapter(llm.to(device), tokenizer, load_dinov2_small(), device, frame_size)
