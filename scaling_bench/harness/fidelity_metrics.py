"""Fidelity harness, part 2: the exact reference attention and the per-layer metrics (mass
recalled vs exact top-B, output error), aggregated over questions and layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def attend(q, k_ctx, v_ctx, valid, k_new, v_new, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the question over [context (valid) + its own tokens (causal)].

    q [Hq, n, D]; k_ctx/v_ctx [Hkv, L, D]; valid [Hkv, L]; k_new/v_new [Hkv, n, D].
    Returns (output [Hq, n, D], distribution per KV head [Hkv, L + n] averaged over the group's
    query heads and the question's tokens).
    """
    Hq, n, D = q.shape
    Hkv, L, _ = k_ctx.shape
    rep = Hq // Hkv
    K = torch.cat([k_ctx.float(), k_new.float()], 1).repeat_interleave(rep, 0)
    V = torch.cat([v_ctx.float(), v_new.float()], 1).repeat_interleave(rep, 0)
    mask = torch.cat([valid[:, None, :].expand(Hkv, n, L),
                      torch.ones(n, n, dtype=torch.bool).tril()[None].expand(Hkv, n, n)], 2)
    logits = torch.einsum("hnd,hld->hnl", q.float(), K) * scale
    logits = logits.masked_fill(~mask.repeat_interleave(rep, 0), float("-inf"))
    p = torch.softmax(logits, -1)
    return p @ V, p.view(Hkv, rep, n, L + n).mean((1, 2))


@dataclass(slots=True)
class Reference:
    """Exact attention of one question at one layer, from the full replay."""

    out: torch.Tensor  # [Hq, n, D]
    p_res: torch.Tensor  # [Hkv] mass on sink + window
    p_past: torch.Tensor  # [Hkv, N] mass on each past token, in time order
    past_order: torch.Tensor  # [N] stream index of each past token
    past_k: torch.Tensor  # [Hkv, N, D] (for the mapping check)
    past_v: torch.Tensor  # [Hkv, N, D]


def _metrics_for(ref: Reference, r, budget: int, out: torch.Tensor) -> dict:
    """Recall, output error and traffic of one retrieval at one (question, layer)."""
    valid = r.valid
    idx = torch.searchsorted(ref.past_order, r.order.clamp(min=0))
    idx = idx.clamp(max=ref.past_order.numel() - 1)
    hit = valid & (ref.past_order[idx] == r.order)
    mapping_errors = int((valid & ~hit).sum())
    # retrieved K and V must be bit-exact with the past's at those tokens
    at = idx[..., None].expand(-1, -1, ref.past_k.shape[-1])
    differs = (ref.past_k.gather(1, at) != r.keys.float()).any(-1) | (ref.past_v.gather(1, at) != r.values.float()).any(-1)
    key_mismatch = int((differs & hit).sum())
    got = (ref.p_past.gather(1, idx) * hit).sum(1)
    top = torch.topk(ref.p_past, min(budget, ref.p_past.shape[1]), dim=1).values.sum(1)
    recall = ((ref.p_res + got) / (ref.p_res + top)).clamp(max=1.0)
    past_recall = (got / top.clamp(min=1e-30)).clamp(max=1.0)
    err = float((out - ref.out).norm() / ref.out.norm().clamp(min=1e-30))
    return {
        "recall": float(recall.mean()), "past_recall": float(past_recall.mean()), "out_err": err,
        "copies": r.copies, "bytes": r.bytes_moved, "tokens": float(valid.sum(1).float().mean()),
        "fill": float(valid.sum(1).float().mean()) / budget, "mapping_errors": mapping_errors + key_mismatch,
    }


def _aggregate(rows: list[list[dict]], num_layers: int) -> dict:
    """rows[question][layer] -> means over (question, layer), worst layer, per-query traffic."""
    def per_layer(key):
        return [sum(q[l][key] for q in rows) / len(rows) for l in range(num_layers)]

    out: dict = {}
    for key, worst in (("recall", min), ("past_recall", min), ("out_err", max)):
        pl = per_layer(key)
        w = worst(range(num_layers), key=lambda l: pl[l])
        out[f"{key}_mean"] = sum(pl) / num_layers
        out[f"{key}_worst_layer"] = pl[w]
        out[f"{key}_worst_layer_index"] = w
        out[f"{key}_per_layer"] = pl
    out["past_recall_per_question"] = [sum(r["past_recall"] for r in q) / num_layers for q in rows]
    out["copies_per_query"] = sum(sum(r["copies"] for r in q) for q in rows) / len(rows)
    out["copies_per_layer"] = out["copies_per_query"] / num_layers
    out["bytes_per_query"] = sum(sum(r["bytes"] for r in q) for q in rows) / len(rows)
    out["tokens_per_head"] = sum(r["tokens"] for q in rows for r in q) / (len(rows) * num_layers)
    out["fill"] = sum(r["fill"] for q in rows for r in q) / (len(rows) * num_layers)
    out["mapping_errors"] = sum(r["mapping_errors"] for q in rows for r in q)
    out["retrieve_ms_per_layer"] = sum(r["retrieve_s"] for q in rows for r in q) / (len(rows) * num_layers) * 1e3
    return out
