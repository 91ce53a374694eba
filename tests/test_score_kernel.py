"""The blocked top-N kernel equals a plain full-matrix topk, history excluded."""

import pytest
import torch

from distrec.score.kernel import top_candidates


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_blocked_topk_equals_full_topk(block):
    gen = torch.Generator().manual_seed(0)
    users, table = torch.randn(9, 8, generator=gen), torch.randn(150, 8, generator=gen)
    history = torch.randint(-1, 150, (9, 20), generator=gen)
    scores, items = top_candidates(users, table, 25, history, block=block)
    full = users @ table.T
    for row in range(9):
        seen = [i for i in history[row].tolist() if i >= 0]
        full[row, seen] = float("-inf")
    expected_scores, expected_items = full.topk(25, dim=1)
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(items, expected_items)  # continuous scores: no ties
    assert not any(set(items[r].tolist()) & set(history[r].tolist()) for r in range(9))


def test_n_larger_than_catalog():
    scores, items = top_candidates(torch.ones(2, 3), torch.eye(3), 10)
    assert items.shape == (2, 3)


def test_faiss_matches_the_kernel():
    pytest.importorskip("faiss")
    from distrec.score.kernel import FaissTopK

    gen = torch.Generator().manual_seed(2)
    users, table = torch.randn(6, 8, generator=gen), torch.randn(90, 8, generator=gen)
    history = torch.randint(-1, 90, (6, 12), generator=gen)
    expected_scores, expected_items = top_candidates(users, table, 15, history)
    scores, items = FaissTopK(table)(users, 15, history)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_blocked_topk_with_many_blocks_and_ties_equals_full_topk(seed):
    """Many blocks and integer-valued scores (ties): the same scores as a full top-k, and
    each item returned really has its score, none twice."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(-3, 4, (17, 4), generator=gen).float()
    table = torch.randint(-3, 4, (3000, 4), generator=gen).float()
    history = torch.randint(-1, 3000, (17, 30), generator=gen)
    scores, items = top_candidates(users, table, 40, history, block=128)
    full = users @ table.T
    for row in range(17):
        full[row, [i for i in history[row].tolist() if i >= 0]] = float("-inf")
    expected, _ = full.topk(40, dim=1)
    torch.testing.assert_close(scores, expected)
    assert torch.equal(full.gather(1, items), scores)
    assert all(len(set(row.tolist())) == 40 for row in items)
