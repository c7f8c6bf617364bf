"""The sampler never produces inf/nan probabilities or an empty nucleus, whatever the request's
temperature and top_p (issue 20, item 2: such a request marked a shard's engine broken)."""

from __future__ import annotations

import pytest
import torch

from mosaic_ray.engine.interface import AskRequest, InvalidInputError
from mosaic_ray.engine.sampling import choose_token, choose_tokens

VOCAB = 1000


@pytest.mark.parametrize("temperature,top_p", [(1e-39, 1.0), (5e-324, 0.5), (1e-5, 1.0), (1.0, 1e-46),
                                               (1.0, 5e-324), (0.7, 1e-45)])
def test_tiny_temperature_or_top_p_picks_the_best_token(temperature, top_p):
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 5
    g = torch.Generator().manual_seed(1)
    assert choose_token(logits, temperature, top_p, g) == int(torch.argmax(logits))
    batch = torch.stack([logits, logits])
    assert choose_tokens(batch, [temperature, 0.0], [top_p, 1.0], [g, None]) == [int(torch.argmax(logits))] * 2


def test_a_seed_beyond_63_bits_is_refused_by_the_request():
    with pytest.raises(InvalidInputError, match="seed"):
        AskRequest("q", seed=2**64)
    AskRequest("q", seed=2**63 - 1)
