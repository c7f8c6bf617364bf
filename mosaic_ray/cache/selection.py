"""Budgeted, best-first selection of retrieval units, and packing their rows per head.

A unit is what a method retrieves whole: a cluster, a frame block, or a single token. Every method
scores its units for the question, then takes them best-first within the budget: with
`fill="prefix"` a prefix of the score order (the first unit that would overflow stops the
selection); with `fill="skip"` a unit that does not fit in what is left is skipped and the next ones
are still tried (`greedy_fill`). Either way the budget is never exceeded.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def time_overlap(t_min: torch.Tensor, t_max: torch.Tensor, since: float | None, until: float | None) -> torch.Tensor:
    """Units whose time span meets [since, until] (None = open end)."""
    ok = torch.ones_like(t_min, dtype=torch.bool)
    if since is not None:
        ok &= t_max >= since
    if until is not None:
        ok &= t_min <= until
    return ok


# Rounds of `greedy_fill`: exact while fewer units than this are skipped. Each round is ~9 small
# launches per layer on a question's path; a prefix wastes less than one unit (max_size tokens) of
# the budget, which matters for small budgets, where few skips fill it.
FILL_ROUNDS = 4


def greedy_fill(z: torch.Tensor, budget: int, rounds: int = FILL_ROUNDS) -> torch.Tensor:
    """Skip-and-continue: z [H, C] unit sizes in score order (0: nothing to take) -> the same with
    the units greedy filling does not take set to 0. Greedy walks best-first and takes a unit when
    it fits in what is left of the budget. In parallel, in rounds: what is left only shrinks, so a
    unit larger than it now is never taken; of the others the prefix that fits is taken. Each round
    reproduces greedy up to its next skipped unit, so `rounds` rounds are exact while at most
    rounds - 1 units are skipped (after that the rest stays untaken). No host sync."""
    taken = torch.zeros_like(z, dtype=torch.bool)
    left = torch.full((z.shape[0], 1), budget, dtype=z.dtype, device=z.device)
    for _ in range(rounds):
        cand = ~taken & (z <= left)  # units of size 0 may be "taken": they add nothing
        taken |= cand & (torch.cumsum(z * cand, 1) <= left)
        left = budget - (z * taken).sum(1, keepdim=True)
    return z * taken


def _fill(z: torch.Tensor, budget: int, fill: str) -> torch.Tensor:
    """z with the units `fill` does not take zeroed ("prefix": those from the first overflow on)."""
    if fill == "skip":
        return greedy_fill(z, budget)
    return z * (torch.cumsum(z, 1) <= budget)


def select_units(scores: torch.Tensor, sizes: torch.Tensor, budget: int,
                 fill: str = "prefix") -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first selection without building a mask: returns (head [m], unit [m]) of the chosen
    units, grouped by head and in score order within a head (one host sync: the nonzero)."""
    order = torch.argsort(scores, dim=1, descending=True)
    s_sorted = scores.gather(1, order)
    z = _fill(sizes.gather(1, order).masked_fill(~torch.isfinite(s_sorted), 0), budget, fill)
    fits = z > 0
    h, k = fits.nonzero(as_tuple=True)
    return h, order[h, k]


def prefix_positions(scores: torch.Tensor, sizes: torch.Tensor, budget: int,
                     fill: str = "prefix") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection of `select_units`, laid out by output position with no host sync: entry p of
    head h is member `member[h, p]` of unit `unit[h, p]`, valid while p is below the selected
    units' total size. Units and members come in the order `select_units` followed by
    `pack_in_order` gives them (head by head, units in score order, members in order), so the rows
    are the same. Output [H, budget]."""
    H, C = scores.shape
    dev = scores.device
    if C == 0 or budget == 0:
        empty = torch.zeros(H, budget, dtype=torch.int64, device=dev)
        return empty, empty, torch.zeros(H, budget, dtype=torch.bool, device=dev)
    order = torch.argsort(scores, dim=1, descending=True)
    s_sorted = scores.gather(1, order)
    z = _fill(sizes.gather(1, order).masked_fill(~torch.isfinite(s_sorted), 0), budget, fill)
    csum = torch.cumsum(z, 1)  # units not taken have size 0 here: they take no position
    total = z.sum(1, keepdim=True)
    p = torch.arange(budget, device=dev)[None].expand(H, budget).contiguous()
    k = torch.searchsorted(csum, p, right=True).clamp(max=C - 1)  # the unit holding position p
    member = p - (csum.gather(1, k) - z.gather(1, k))
    return order.gather(1, k), member, p < total


def pack_in_order(head: torch.Tensor, rows: torch.Tensor, num_heads: int, budget: int) -> torch.Tensor:
    """Place valid rows (>= 0) of units [m, M], listed head by head in priority order, into
    [H, budget]; rows past a head's budget are dropped. No sort and no host sync."""
    valid = rows >= 0
    v = valid.flatten().long()
    before = torch.cumsum(v, 0) - v  # valid rows ahead of each entry, over all heads
    hh = head[:, None].expand_as(rows).flatten()
    first = torch.full((num_heads,), before.numel(), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, hh, before, "amin")
    slot = before - first[hh]
    keep = valid.flatten() & (slot < budget)
    out = torch.full((num_heads, budget + 1), -1, dtype=torch.int64, device=rows.device)
    out.index_put_((hh, torch.where(keep, slot, budget)), torch.where(keep, rows.flatten(), -1))
    return out[:, :budget]
