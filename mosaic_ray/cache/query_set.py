"""What a question asks a retriever with, for one layer: per KV head either its mean query
([H, D], `CacheConfig.scoring="mean"`) or a `QuerySet` (`"max"`, `"mass"`): every query of the group's heads
and the question's tokens, scaled as attention scales them, with each query's log-partition over
the stream's resident tokens.

With a query set a unit (token, frame block, cluster) scores by its best per-token attention
estimate over those queries: max_q (q . rep - log Z_q), where Z_q is the resident partition plus
the past's, each unit counted size times (a cluster by its centroid). Why: a mean over ~20 prompt
tokens x the group's query heads blurs what single heads look at (on real SmolLM2 keys some head
puts 0.57-0.74 of its attention on a needle caption that the mean query gives 0.001-0.04; issue
19's diagnosis), and normalising per query keeps a query with large logits from deciding alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
# logits [H, block, Q] computed at once: bounds the memory of scoring a long past
SCORE_BLOCK_ELEMS = 1 << 24


@dataclass(slots=True)
class QuerySet:
    """q [H, Q, D] float32, already multiplied by the attention scale (q . k is a logit);
    log_z [H, Q] float32, log sum exp of each query's logits over the resident tokens."""

    q: torch.Tensor
    log_z: torch.Tensor
    # How a unit's per-query estimates combine (`CacheConfig.scoring`): "max", its best one; "mass",
    # their mean, i.e. the attention one member gets averaged over the queries. For exact keys
    # (the token method) "mass" ranks by the true attention mass of the question's prefill (up to
    # causality inside the question): exact top-B by true attention, the needle harness's oracle.
    reduce: str = "max"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.q.shape)

    def unit_scores(self, reps: torch.Tensor, sizes: torch.Tensor | None = None,
                    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                    spread: torch.Tensor | None = None) -> torch.Tensor:
        """[H, N]: max over the queries of log(estimated attention one member of unit n gets),
        reps [H, N, D] (a unit's key: the token's, or a mean key); sizes [H, N] members per unit
        (None: one each). With bounds (lo, hi) [H, N, D], per-dimension min / max of each unit's
        keys, a unit's logit is the largest any member can have (`bound_logits`); the partition
        still counts it by reps. With spread [H, N], each unit's key variance per dimension, a
        member's logit is estimated as q . rep + |q|^2 spread / 2: the mean of exp(q . k) over
        members spread normally around rep (a centroid alone underestimates it, by Jensen), in the
        partition and in the score. A unit of size 0 scores -inf. No host sync."""
        H, N, _ = reps.shape
        Q = self.q.shape[1]
        if N == 0:
            return torch.empty(H, 0, dtype=torch.float32, device=reps.device)
        step = max(1, SCORE_BLOCK_ELEMS // max(1, H * Q))
        log_size = None if sizes is None else sizes.float().log()  # log 0 = -inf: empty units weigh nothing
        half_q2 = None if spread is None else 0.5 * (self.q * self.q).sum(-1)[:, None, :]  # [H, 1, Q]

        def logits(n0):
            lg = self._logits(reps[:, n0:n0 + step])
            return lg if spread is None else lg + half_q2 * spread[:, n0:n0 + step, None].float()

        # pass 1: the past's part of each query's partition
        past = torch.full((H, Q), NEG_INF, dtype=torch.float32, device=reps.device)
        for n0 in range(0, N, step):
            lg = logits(n0)
            if log_size is not None:
                lg = lg + log_size[:, n0:n0 + step, None]
            past = torch.logaddexp(past, torch.logsumexp(lg, 1))
        log_z = torch.logaddexp(self.log_z, past)[:, None, :]  # [H, 1, Q]
        # pass 2: each unit's best normalised logit
        def best(n0):
            if bounds is None:
                return logits(n0)
            return bound_logits(self.q, bounds[0][:, n0:n0 + step], bounds[1][:, n0:n0 + step])

        if self.reduce == "mass":
            combine = lambda lg: torch.logsumexp(lg, 2) - math.log(Q)  # noqa: E731
        else:
            combine = lambda lg: lg.amax(2)  # noqa: E731
        out = torch.cat([combine(best(n0) - log_z) for n0 in range(0, N, step)], 1)
        return out if sizes is None else out.masked_fill(sizes <= 0, NEG_INF)

    def _logits(self, reps: torch.Tensor) -> torch.Tensor:
        return torch.bmm(reps.float(), self.q.transpose(1, 2))  # [H, n, Q]


def bound_logits(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[H, N, Q]: for queries q [H, Q, D] and per-dimension key bounds lo / hi [H, N, D], the
    largest q . k over any k inside the bounds: q+ . hi + q- . lo (Quest's page bound)."""
    pos, neg = q.clamp(min=0), q.clamp(max=0)
    return torch.bmm(hi.float(), pos.transpose(1, 2)) + torch.bmm(lo.float(), neg.transpose(1, 2))


def mean_query(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[H, D]: one sequence's queries q [T, Hq, D] averaged over its tokens and each group's heads."""
    T, Hq, D = q.shape
    return q.float().reshape(T, num_kv_heads, Hq // num_kv_heads, D).mean((0, 2))


def query_set(q: torch.Tensor, k_resident: torch.Tensor, scale: float, num_kv_heads: int,
              reduce: str = "max") -> QuerySet:
    """One sequence's queries q [T, Hq, D] (after RoPE) as a QuerySet against its resident keys
    k_resident [H, R, D] (sink + window, after RoPE): Q = T x (Hq / H) queries per KV head,
    combined per unit by `reduce` ("max" | "mass")."""
    T, Hq, D = q.shape
    H = num_kv_heads
    qs = (q.float() * scale).reshape(T, H, Hq // H, D).permute(1, 0, 2, 3).reshape(H, -1, D)
    if k_resident.shape[1] == 0:
        log_z = torch.full(qs.shape[:2], NEG_INF, dtype=torch.float32, device=qs.device)
    else:
        log_z = torch.logsumexp(torch.bmm(qs, k_resident.float().transpose(1, 2)), 2)
    return QuerySet(qs, log_z, reduce)
