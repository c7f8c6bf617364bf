"""select_budget kernel vs its sort-based torch reference: the same mask, counts and tokens."""

import pytest
import torch

from mosaic_ray.kernels.select_budget import Selection, select_budget, select_budget_reference, selected_ids

# (G, C, block_c or None): block_c below C exercises the multi-chunk passes.
SHAPES = [(1, 1, None), (3, 7, None), (2, 100, 16), (4, 300, None), (2, 700, 128)]
BUDGETS = [0, 1, 13, 200, 2**33]
SCORE_DTYPES = [torch.float32, torch.bfloat16]  # bf16 scores: many exact ties


def make(G, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn((G, C), generator=g)
    if C > 6:
        scores[:, ::7] = float("-inf")  # padding slots
        scores[0, 1] = float("nan")
        scores[:, 2:5] = 0.25  # a tie group
        scores[:, 5] = -0.0  # -0.0 ties with +0.0
        scores[:, 6] = 0.0
    sizes = torch.randint(0, 40, (G, C), generator=g)
    if C > 3:
        sizes[:, 3] = 0  # empty clusters are allowed
    return scores.to(dtype).to(device), sizes.to(device)


def assert_same(got: Selection, ref: Selection):
    assert torch.equal(got.mask.cpu(), ref.mask.cpu())
    assert torch.equal(got.count.cpu(), ref.count.cpu())
    assert torch.equal(got.tokens.cpu(), ref.tokens.cpu())


@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("G,C,block_c", SHAPES)
def test_select_budget_matches_reference(device, dtype, budget, G, C, block_c):
    scores, sizes = make(G, C, dtype, device)
    got = select_budget(scores, sizes, budget, backend="triton", block_c=block_c)
    ref = select_budget_reference(scores.cpu(), sizes.cpu(), budget)
    assert_same(got, ref)
    assert bool((got.tokens.cpu() <= budget).all())


def test_select_budget_is_a_best_first_prefix(device):
    """The semantics, checked directly: taken clusters are a prefix of the score order, fit the
    budget, and the next one in order would not fit."""
    scores, sizes = make(3, 300, torch.float32, device, seed=5)
    budget = 900
    sel = select_budget(scores, sizes, budget, backend="triton")
    s = scores.cpu().float().nan_to_num(nan=float("-inf"))
    for g in range(3):
        order = torch.sort(s[g], descending=True, stable=True).indices
        taken = sel.mask.cpu()[g][order]
        k = int(taken.sum())
        assert bool(taken[:k].all()) and not bool(taken[k:].any())
        used = int(sizes.cpu()[g][order][:k].sum())
        assert used == int(sel.tokens[g]) <= budget
        if k < 300 and s[g][order[k]] > float("-inf"):
            assert used + int(sizes.cpu()[g][order[k]]) > budget


def test_select_budget_exact_fill_then_zero_sizes(device):
    """After the budget is exactly filled, following clusters of size 0 still fit."""
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.5]], device=device)
    sizes = torch.tensor([[5, 5, 0, 1, 0]], device=device)
    got = select_budget(scores, sizes, 10, backend="triton")
    assert got.mask.cpu().tolist() == [[True, True, True, False, False]]
    assert_same(got, select_budget_reference(scores.cpu(), sizes.cpu(), 10))


def test_select_budget_per_group_budgets(device):
    scores, sizes = make(4, 120, torch.float32, device, seed=2)
    budgets = torch.tensor([0, 50, 500, 10**6], device=device)
    got = select_budget(scores, sizes, budgets, backend="triton", block_c=32)
    assert_same(got, select_budget_reference(scores.cpu(), sizes.cpu(), budgets.cpu()))


def test_select_budget_all_invalid_and_empty(device):
    scores = torch.full((2, 9), float("-inf"), device=device)
    sizes = torch.ones((2, 9), dtype=torch.int32, device=device)
    got = select_budget(scores, sizes, 100, backend="triton")
    assert not got.mask.any() and got.count.tolist() == [0, 0] and got.tokens.tolist() == [0, 0]
    empty = select_budget(torch.empty((3, 0), device=device), torch.empty((3, 0), dtype=torch.int64, device=device), 5, backend="triton")
    assert empty.mask.shape == (3, 0) and empty.count.tolist() == [0, 0, 0]


def test_selected_ids():
    mask = torch.tensor([[False, True, True, False], [False, False, False, True]])
    sel = Selection(mask, mask.sum(1), mask.sum(1))
    assert selected_ids(sel).tolist() == [[1, 2], [3, -1]]
    assert selected_ids(sel, max_count=3).tolist() == [[1, 2, -1], [3, -1, -1]]


def test_select_budget_rejects_negative_budget():
    with pytest.raises(ValueError, match="budget"):
        select_budget(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.int64), -1, backend="triton")
