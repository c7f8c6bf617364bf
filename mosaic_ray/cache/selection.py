"""Budgeted, best-first selection of retrieval units, and packing their rows per head.

A unit is what a method retrieves whole: a cluster, a frame block, or a single token. Every method
scores its units for the question, then takes them best-first while the running token count stays
within the budget (a prefix of the score order: the first unit that would overflow stops the
selection, so the budget is never exceeded).
"""

from __future__ import annotations

import torch

from mosaic_ray.cache.token_batch import ranks_within

NEG_INF = float("-inf")


def select_prefix(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """scores, sizes [H, U] (score -inf = not eligible) -> chosen [H, U] bool, sum(sizes) <= budget."""
    order = torch.argsort(scores, dim=1, descending=True)
    s_sorted = scores.gather(1, order)
    z_sorted = sizes.gather(1, order).masked_fill(~torch.isfinite(s_sorted), 0)
    fits = (torch.cumsum(z_sorted, 1) <= budget) & torch.isfinite(s_sorted) & (z_sorted > 0)
    chosen = torch.zeros_like(fits)
    chosen.scatter_(1, order, fits)
    return chosen


def pack_rows(head: torch.Tensor, rows: torch.Tensor, num_heads: int, budget: int, truncate: bool = False) -> torch.Tensor:
    """Place rows [m, M] (-1 = none) of units owned by heads `head` [m] into [H, budget] (-1 pad).

    Units must come in priority order within a head; with `truncate` the rows past the budget are
    dropped (used when unit sizes were estimates), otherwise overflowing is a bug and raises.
    """
    valid = rows >= 0
    h = head[:, None].expand_as(rows)[valid]
    r = rows[valid]
    slot = ranks_within(h)
    if truncate:
        keep = slot < budget
        h, r, slot = h[keep], r[keep], slot[keep]
    elif r.numel() and int(slot.max()) >= budget:
        raise AssertionError("selection exceeded its budget")
    out = torch.full((num_heads, budget), -1, dtype=torch.int64, device=rows.device)
    out[h, slot] = r
    return out


def time_overlap(t_min: torch.Tensor, t_max: torch.Tensor, since: float | None, until: float | None) -> torch.Tensor:
    """Units whose time span meets [since, until] (None = open end)."""
    ok = torch.ones_like(t_min, dtype=torch.bool)
    if since is not None:
        ok &= t_max >= since
    if until is not None:
        ok &= t_min <= until
    return ok
