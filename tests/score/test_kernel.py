"""The blocked top-N kernel equals a plain full-matrix topk, history excluded."""

import pytest
import torch

from distrec.score.kernel import top_candidates


@pytest.mark.parametrize("block", [7, 64, 74, 75, 1000])  # 75: exactly 2 blocks' worth, scored as one
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


def test_n_larger_than_catalog_gives_every_unseen_item_in_order():
    users = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    scores, items = top_candidates(users, torch.eye(3), 10, torch.tensor([[-1], [2]]))
    assert items[0].tolist() == [0, 2, 1] and scores[0].tolist() == [3.0, 2.0, 1.0]
    # user 1 has seen item 2: the last place is the excluded item at -inf, never a seen item ranked as a find
    assert items[1, :2].tolist() == [1, 0] and scores[1, :2].tolist() == [2.0, 1.0]
    assert scores[1, 2:].tolist() == [float("-inf")] * (items.shape[1] - 2)


def test_faiss_matches_the_kernel():
    pytest.importorskip("faiss")
    from distrec.score.faiss_topk import FaissTopK

    gen = torch.Generator().manual_seed(2)
    users, table = torch.randn(6, 8, generator=gen), torch.randn(90, 8, generator=gen)
    history = torch.randint(-1, 90, (6, 12), generator=gen)
    expected_scores, expected_items = top_candidates(users, table, 15, history)
    scores, items = FaissTopK(table)(users, 15, history)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(4))
def test_blocked_topk_with_many_blocks_and_ties_equals_full_topk(seed, precision):
    """Many blocks and integer-valued scores (ties): the same scores as a full top-k, and
    each item returned really has its score, none twice."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(-3, 4, (17, 4), generator=gen).float()
    table = torch.randint(-3, 4, (3000, 4), generator=gen).float()
    history = torch.randint(-1, 3000, (17, 30), generator=gen)
    scores, items = top_candidates(users, table, 40, history, block=128, precision=precision)
    full = users @ table.T
    for row in range(17):
        full[row, [i for i in history[row].tolist() if i >= 0]] = float("-inf")
    expected, _ = full.topk(40, dim=1)
    torch.testing.assert_close(scores, expected)
    assert torch.equal(full.gather(1, items), scores)
    assert all(len(set(row.tolist())) == 40 for row in items)


def reference_top(users, table, n, history):
    """Plain full matrix, seen items -inf, best first with ties to the lower item index."""
    full = (users @ table.T).double()
    for row in range(len(users)):
        full[row, [i for i in history[row].tolist() if i >= 0]] = float("-inf")
    n = min(n, table.shape[0])
    items = torch.stack([torch.tensor(sorted(range(table.shape[0]), key=lambda i: (-full[r, i].item(), i))[:n])
                         for r in range(len(users))])
    return full.gather(1, items).float(), items


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("block", [5, 16, 17, 333, 2048])
def test_cpu_scan_equals_reference_with_ties_and_exhausted_histories(block, precision):
    """The compiled CPU scan against the plain reference, item for item: integer scores (many
    ties, lower item first), a user who has seen all but 3 items (the rest of the list is seen
    items at -inf), an empty history, and blocks that do not divide the catalog."""
    gen = torch.Generator().manual_seed(5)
    users = torch.randint(-2, 3, (6, 3), generator=gen).float()
    table = torch.randint(-2, 3, (400, 3), generator=gen).float()
    history = torch.full((6, 397), -1, dtype=torch.long)
    history[0] = torch.arange(397)
    history[1, :50] = torch.randint(0, 400, (50,), generator=gen)
    history[3, -20:] = torch.arange(380, 400)
    scores, items = top_candidates(users, table, 30, history, block=block, precision=precision)
    expected_scores, expected_items = reference_top(users, table, 30, history)
    assert torch.equal(scores[1:], expected_scores[1:]) and torch.equal(items[1:], expected_items[1:])
    assert sorted(items[0, :3].tolist()) == [397, 398, 399] and torch.isinf(scores[0, 3:]).all()
    assert set(items[0, 3:].tolist()) <= set(range(397)) and len(set(items[0].tolist())) == 30


def test_cpu_scan_and_torch_path_agree_on_continuous_scores():
    from distrec.score.kernel_torch import top_candidates_torch

    gen = torch.Generator().manual_seed(6)
    users, table = torch.randn(40, 16, generator=gen), torch.randn(5000, 16, generator=gen)
    history = torch.randint(-1, 5000, (40, 60), generator=gen)
    fast = top_candidates(users, table, 100, history, block=700)
    plain = top_candidates_torch(users, table, 100, history, 65536)
    assert torch.equal(fast[1], plain[1])
    torch.testing.assert_close(fast[0], plain[0])


def test_non_finite_user_vectors_are_refused():
    users = torch.zeros(2, 3)
    users[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        top_candidates(users, torch.eye(3), 2)


def test_empty_catalog_or_zero_candidates_give_empty_lists():
    users = torch.randn(3, 4)
    for table, n in ((torch.empty(0, 4), 5), (torch.randn(10, 4), 0)):
        scores, items = top_candidates(users, table, n)
        assert scores.shape == items.shape == (3, 0)


def test_bf16_candidates_rescored_in_fp32_give_the_fp32_top_n():
    """The bf16 path on continuous scores: the same items and the fp32 scores, and most users
    are settled from the bf16 candidates (not all scored again in fp32)."""
    from distrec.score import bf16_bound

    gen = torch.Generator().manual_seed(7)
    users, table = torch.randn(64, 16, generator=gen), torch.randn(20000, 16, generator=gen)
    history = torch.randint(-1, 20000, (64, 40), generator=gen)
    before = dict(bf16_bound.STATS)
    fast = top_candidates(users, table, 50, history, block=4096, precision="bf16")
    again = bf16_bound.STATS["fp32_again"] - before["fp32_again"]
    assert bf16_bound.STATS["bf16_users"] - before["bf16_users"] == 64 and again < 8
    expected_scores, expected_items = reference_top(users, table, 50, history)
    assert torch.equal(fast[1], expected_items)
    torch.testing.assert_close(fast[0], expected_scores, rtol=1e-5, atol=1e-5)


def test_bf16_path_stays_exact_where_bf16_cannot_tell_items_apart():
    """400 items within 1e-4 of one direction (bf16 rounds them to the same scores) and one
    item with a huge norm (a loose rounding bound): every user falls back to fp32 where the
    candidates cannot prove the top n, and the lists equal the reference."""
    from distrec.score import bf16_bound

    gen = torch.Generator().manual_seed(8)
    users = torch.randn(8, 12, generator=gen)
    table = torch.randn(3000, 12, generator=gen)
    table[:400] = users[0] + 1e-4 * torch.randn(400, 12, generator=gen)
    table[2999] = -50 * users[1]
    history = torch.full((8, 1), -1, dtype=torch.long)
    before = bf16_bound.STATS["fp32_again"]
    scores, items = top_candidates(users, table, 100, history, precision="bf16")
    assert bf16_bound.STATS["fp32_again"] > before  # user 0 at least could not be settled in bf16
    expected_scores, expected_items = reference_top(users, table, 100, history)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision"):
        top_candidates(torch.ones(1, 2), torch.eye(2), 1, precision="fp16")


def test_bf16_table_cache_follows_the_catalog():
    """A catalog changed in place, or another one, is converted again (no stale bf16 copy)."""
    gen = torch.Generator().manual_seed(9)
    users, table = torch.randn(4, 8, generator=gen), torch.randn(500, 8, generator=gen)
    top_candidates(users, table, 10, precision="bf16")
    table.mul_(-1)
    none = torch.full((4, 1), -1)
    assert torch.equal(top_candidates(users, table, 10, precision="bf16")[1], reference_top(users, table, 10, none)[1])
    other = torch.randn(500, 8, generator=gen)
    assert torch.equal(top_candidates(users, other, 10, precision="bf16")[1], reference_top(users, other, 10, none)[1])


def test_bf16_path_is_exact_for_scores_below_the_bf16_range():
    """Scores of ~1e-41 round to 0 in bf16 (and AMX flushes subnormals): the absolute term of
    the bound sends the user to fp32 instead of settling on a tie of zeros."""
    users = torch.tensor([[2.0**-70]])
    table = torch.full((100, 1), 2.0**-66)
    table[99] = 1.5 * 2.0**-66
    for precision in ("bf16", "fp32"):
        assert top_candidates(users, table, 1, precision=precision)[1].item() == 99


def test_non_finite_catalog_is_refused_and_inference_tensors_work():
    users, table = torch.randn(2, 4), torch.randn(300, 4)
    with torch.inference_mode():
        frozen = table.clone()
    assert torch.equal(top_candidates(users, frozen, 5, precision="bf16")[1], top_candidates(users, table, 5)[1])
    table[7, 2] = float("inf")
    with pytest.raises(ValueError, match="catalog vectors contain NaN or infinity"):
        top_candidates(users, table, 5)


def _torch_bf16(users, table, n, history, block):
    """The GPU bf16 path (torch ops only), run here on the CPU."""
    from distrec.score import bf16_bound, kernel_torch

    return kernel_torch.top_candidates_torch_bf16(users, table, n, history, block, bf16_bound.catalog_facts(table))


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_torch_bf16_path_equals_the_fp32_reference(block):
    gen = torch.Generator().manual_seed(11)
    users, table = torch.randn(9, 8, generator=gen), torch.randn(300, 8, generator=gen)
    history = torch.randint(-1, 300, (9, 25), generator=gen)
    scores, items = _torch_bf16(users, table, 20, history, block)
    expected_scores, expected_items = reference_top(users, table, 20, history)
    assert torch.equal(items, expected_items)
    assert torch.allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_torch_bf16_path_redoes_users_bf16_cannot_settle_and_stays_exact():
    """Items that differ below bf16's resolution: the bound cannot settle most users, who are
    scored again in fp32; the lists still equal the reference."""
    from distrec.score.bf16_bound import STATS

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, generator=gen)
    table = base + 1e-4 * torch.randn(2000, 16, generator=gen)
    users = base.repeat(5, 1) + 0.01 * torch.randn(5, 16, generator=gen)
    history = torch.full((5, 3), -1, dtype=torch.long)
    history[0] = torch.tensor([4, 9, 1999])
    before = STATS["fp32_again"]
    scores, items = _torch_bf16(users, table, 10, history, 512)
    assert STATS["fp32_again"] > before
    expected_scores, expected_items = reference_top(users, table, 10, history)
    assert torch.equal(items, expected_items)
    assert not set(items[0].tolist()) & {4, 9, 1999}


def test_torch_bf16_path_gives_seen_items_last_when_the_history_leaves_too_few():
    gen = torch.Generator().manual_seed(2)
    users, table = torch.randn(2, 4, generator=gen), torch.randn(40, 4, generator=gen)
    history = torch.stack([torch.arange(37), torch.full((37,), -1)])
    scores, items = _torch_bf16(users, table, 5, history, 16)
    expected_scores, expected_items = reference_top(users, table, 5, history)
    assert torch.equal(items[0, :3], expected_items[0, :3]) and torch.isinf(scores[0, 3:]).all()
    assert torch.equal(items[1], expected_items[1])
