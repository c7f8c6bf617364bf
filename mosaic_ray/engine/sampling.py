"""Token choice for answers: greedy, or temperature + nucleus (top-p) sampling with a seed.

Whatever the caller passes, no logit becomes inf and no nucleus is empty: a temperature below
`bounds.MIN_TEMPERATURE` is greedy, and the nucleus always holds the best token (a top_p that
rounds to 0 in float32 would otherwise keep nothing, and multinomial would raise).
"""

from __future__ import annotations

import torch

from mosaic_ray.bounds import MIN_TEMPERATURE


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits [vocab] -> token id. temperature 0 (or below MIN_TEMPERATURE) means greedy (argmax,
    ties to the lowest id)."""
    if temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        keep[0] = True  # the best token, whatever top_p rounds to in float32
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def choose_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                  generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, vocab] -> one token per row: greedy rows with one argmax and one copy to the host
    for the whole batch, sampled rows one by one (`choose_token`)."""
    greedy = torch.argmax(logits, -1).tolist()
    return [g if t < MIN_TEMPERATURE else choose_token(logits[i], t, p, gen)
            for i, (g, t, p, gen) in enumerate(zip(greedy, temperatures, top_ps, generators))]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
