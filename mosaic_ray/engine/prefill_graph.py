"""PrefillGraph: a question prefill replayed from CUDA graphs, one piece between two attentions
(vLLM's piecewise graphs), for one bucket of packed tokens.

Why: a question prefill is ~20-60 text tokens through every layer. Eagerly, transformers' decoder
layer is ~40 small launches (norms, projections, M-RoPE, MLP) and the host issues them far slower
than the GPU runs them: on the H200 at 7b-shape a prefill took 62 ms of host time for 8.4 ms of
kernels (`docs/benchmarks.md` 10.2). Replayed, a layer is two graph launches plus its attention.

What is captured: the forward of `tokens` packed text tokens, cut at every attention call, as
L + 1 graphs over static buffers (token ids, positions [P, 1, tokens], the slot of each token's
K/V): piece 0 = embedding, rotary tables and layer 0 up to its attention (its K/V stored by slot);
piece l = layer l-1's output projection and MLP, then layer l up to its attention; piece L = the
last layer's rest and the final norm. Between pieces, eagerly: the layer's retrieval for the
questions in prefill (`attention.retrieval`) and one ragged attention call over the real tokens
(`attention.backend.attend`), written into the buffer the next piece reads. These two stay eager
because their shapes change every step (slots attended, clusters scored).

Invariants: nothing a piece computes for a token depends on the other tokens (only attention
mixes tokens, and it runs eagerly over the real ones), so padding changes no real output: padding
tokens have id 0, stale positions, and store their K/V into the runner's scratch slot. The pieces
share one memory pool with the other prefill buckets and are replayed whole, in capture order,
never interleaved with another graph of that pool (the engine has one thread of steps).
"""

from __future__ import annotations

import torch

from mosaic_ray.attention.backend import AttentionMetadata
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.model.adapter import ModelAdapter
from mosaic_ray.model.attention import StepContext, attend_layer
from mosaic_ray.transfer import to_device


class PrefillGraph:
    def __init__(self, adapter: ModelAdapter, kv_pool: DeviceKVPool, scratch: int, tokens: int, pool) -> None:
        dev = adapter.device
        self.adapter, self.kv_pool, self.tokens, self.scratch, self._pool = adapter, kv_pool, tokens, scratch, pool
        P, L = adapter.layout.pos_dims, adapter.layout.num_layers
        self.ids = torch.zeros(1, tokens, dtype=torch.long, device=dev)
        self.pos = torch.zeros(P, 1, tokens, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((tokens,), scratch, dtype=torch.int64, device=dev)
        # what the captured forward reads of the metadata: the slots its new K/V go to
        zero = torch.zeros(2, dtype=torch.int32, device=dev)
        self._meta = AttentionMetadata(self.slot_mapping, self.slot_mapping[:0], zero, zero, max_q=tokens, max_kv=0,
                                       q_bounds=[(0, tokens)])
        self.q: list[torch.Tensor | None] = [None] * L  # each layer's queries [tokens, Hq, D] (piece l's output)
        self.out: list[torch.Tensor | None] = [None] * L  # each layer's attention output (piece l+1's input)
        self.scale: list[float] = [0.0] * L
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self._open: torch.cuda.CUDAGraph | None = None
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernels chosen, workspaces and the attention buffers allocated
                self._forward(self._warm_break)
        torch.cuda.synchronize(dev)
        with torch.cuda.stream(side):
            try:
                self._begin()
                self.hidden = self._forward(self._capture_break)  # [1, tokens, hidden], by the last piece
                self._end()
            except BaseException:
                if self._open is not None:  # leave no capture open on the stream
                    try:
                        self._open.capture_end()
                    except Exception:
                        pass
                raise
        torch.cuda.current_stream(dev).wait_stream(side)

    # ------------------------------------------------------------------ capture
    def _forward(self, layer_break) -> torch.Tensor:
        ad = self.adapter
        ctx = StepContext([], self.kv_pool, self._meta, layer_break=layer_break)
        return ad.forward(ad.embedding()(self.ids), self.pos, ctx)

    def _warm_break(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        if self.out[layer] is None:
            self.out[layer] = torch.zeros_like(q)
        self.scale[layer] = scale
        return self.out[layer]

    def _capture_break(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        self.q[layer] = q  # held: its memory stays the piece's output
        self._end()
        self._begin()
        return self.out[layer]

    def _begin(self) -> None:
        self._open = torch.cuda.CUDAGraph()
        # thread_local: other threads of a shard may use the GPU while the engine thread captures
        self._open.capture_begin(pool=self._pool, capture_error_mode="thread_local")

    def _end(self) -> None:
        self._open.capture_end()
        self.pieces.append(self._open)
        self._open = None

    # ------------------------------------------------------------------ replay
    def run(self, ids: list[int], positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The packed tokens `ids` (at most `tokens`) at `positions` [P, T] -> last hidden states
        [T, hidden]. `ctx` is the step's: its metadata's slot mapping says where each token's K/V
        goes, its streams which questions retrieve."""
        T, dev = len(ids), self.adapter.device
        if T > self.tokens:
            raise ValueError(f"{T} tokens do not fit a prefill graph of {self.tokens}")
        self.ids[0, :T].copy_(to_device(ids, dev, torch.long))
        self.pos[:, 0, :T].copy_(positions)
        self.slot_mapping[:T].copy_(ctx.meta.slot_mapping)
        self.slot_mapping[T:].fill_(self.scratch)  # padding never writes a real slot
        for layer, piece in enumerate(self.pieces[:-1]):
            piece.replay()
            self.out[layer][:T].copy_(attend_layer(ctx, layer, self.q[layer][:T], self.scale[layer]))
        self.pieces[-1].replay()
        return self.hidden[0, :T]
