"""ModelAdapter: what the engine needs from a vision-language model, over transformers' own classes.

Verbs: encode_frames / frame_chunk / text_chunk / question_chunk / forward / logits.

A *chunk* is a run of tokens appended to a stream at once: one frame (vision tokens wrapped in the
model's markers), one caption, one question. The adapter gives its input embeddings and positions
relative to the chunk's start; the engine offsets positions by the stream's next position, so a
chunked stream sees exactly the positions the model would give the whole sequence at once.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch

from mosaic_ray.config import KVLayout
from mosaic_ray.model.attention import ATTENTION_NAME, StepContext
from mosaic_ray.transfer import to_device


@dataclass(slots=True)
class Chunk:
    """embeds [n, hidden]; positions [P, n] relative to the chunk start; span: positions it uses;
    token_ids [n] (-1 where the input is not a text token, e.g. vision features); text: a text
    segment (a caption, a prompt), not a frame (whose markers are text tokens too)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    span: int
    token_ids: torch.Tensor
    text: bool = False

    @property
    def size(self) -> int:
        return self.embeds.shape[0]


class ModelAdapter(abc.ABC):
    """A VLM seen as: a vision encoder, an embedding table, a decoder with our attention, a head."""

    name: str = ""

    def __init__(self, model, tokenizer, device: torch.device, frame_size: int) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.frame_size = frame_size
        self.model.set_attn_implementation(ATTENTION_NAME)

    # ---- shapes (subclasses set `self._layout` from their config)
    _layout: KVLayout

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end an answer: the chat turn's end and the tokenizer's end of text."""
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)

    # ---- inputs
    @abc.abstractmethod
    def encode_frames(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """RGB uint8 frames [H, W, 3] -> per frame its vision embeddings [n_i, hidden] (one batch)."""

    @abc.abstractmethod
    def frame_chunk(self, features: torch.Tensor, timestamp: float) -> Chunk: ...

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.embedding()(to_device(ids, self.device, torch.long))

    def text_chunk(self, text: str) -> Chunk:
        return self.ids_chunk(self.tokenizer.encode(text, add_special_tokens=False))

    def ids_chunk(self, ids: list[int]) -> Chunk:
        n = len(ids)
        pos = torch.arange(n, device=self.device)[None].expand(self.layout.pos_dims, n)
        return Chunk(self.embed_ids(ids), pos, n, torch.tensor(ids, dtype=torch.long), text=True)

    def caption_text(self, text: str, timestamp: float) -> str:
        """How a timestamped caption is written into the stream."""
        return f"[{timestamp:.1f}s] {text}\n"

    def question_text(self, question: str) -> tuple[str, str]:
        """(prompt before the answer, text that closes the answer turn): ChatML, which both the
        Qwen2-VL family and SmolLM2 use."""
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n"

    def prefix_text(self) -> str:
        """Text every stream starts with (system prompt); stays in the resident sink."""
        return ""

    # ---- compute
    @abc.abstractmethod
    def embedding(self) -> torch.nn.Module: ...

    @abc.abstractmethod
    def decoder(self) -> torch.nn.Module:
        """transformers' text model (embeddings in, hidden states out)."""

    @abc.abstractmethod
    def lm_head(self) -> torch.nn.Module: ...

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """embeds [b, n, hidden], positions [P, b, n] -> last hidden states [b, n, hidden]."""
        pos = positions if self.layout.pos_dims == 3 else positions[0]
        with ctx:
            out = self.decoder()(
                inputs_embeds=embeds, position_ids=pos, past_key_values=ctx,
                attention_mask={"full_attention": None, "sliding_attention": None}, use_cache=True,
            )
        return out.last_hidden_state

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head()(hidden).float()
