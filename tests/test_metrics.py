"""Full-ranking metrics on textbook cases, ties, history exclusion, and a brute-force check."""

import math

import pytest
import torch

from distrec.metrics import exclude_history, ranking_metrics, target_ranks


def test_ranks_count_higher_scores_and_expected_position_in_ties():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.1],   # target 2 ties with 1 and 3: ranks 2..4 -> 3
                           [0.1, 0.2, 0.3, 0.4, 0.5]])  # target 4 is the best: rank 1
    assert target_ranks(scores, torch.tensor([2, 4])).tolist() == [3.0, 1.0]


def test_all_equal_scores_give_a_random_ranking_not_a_perfect_one():
    n = 101
    ranks = target_ranks(torch.zeros(4, n), torch.tensor([0, 5, 50, 100]))
    assert ranks.tolist() == [51.0] * 4  # the expected rank of a random order
    assert ranking_metrics(ranks)["hr@10"] == 0.0


def test_textbook_values():
    ranks = torch.tensor([1.0, 3.0, 11.0])
    m = ranking_metrics(ranks, ks=(10,))
    assert m["ndcg@10"] == pytest.approx((1.0 + 1.0 / math.log2(4) + 0.0) / 3)  # 1/log2(rank+1)
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["mrr@10"] == pytest.approx((1.0 + 1 / 3) / 3)
    assert m["users"] == 3


def test_history_items_are_excluded_but_not_the_target():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    history = torch.tensor([[-1, 0, 2]])  # items 0 and 2 were seen; -1 is padding
    masked = exclude_history(scores, history, torch.tensor([2]))
    assert masked.tolist() == [[float("-inf"), 4.0, 3.0, 2.0]]  # the target (2) keeps its score
    assert target_ranks(masked, torch.tensor([2])).item() == 2.0


def test_agrees_with_a_plain_python_ranking_on_random_cases():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (50, 30), generator=gen).float()  # many ties
    targets = torch.randint(0, 30, (50,), generator=gen)
    ranks = target_ranks(scores, targets)
    for row, target, rank in zip(scores.tolist(), targets.tolist(), ranks.tolist()):
        mine = row[target]
        higher = sum(s > mine for s in row)
        equal = sum(s == mine for s in row)
        positions = [higher + 1 + i for i in range(equal)]  # every placement among the ties
        assert rank == pytest.approx(sum(positions) / len(positions))


def test_agrees_with_torchmetrics_without_ties():
    pytest.importorskip("torchmetrics")
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG

    gen = torch.Generator().manual_seed(1)
    users, items = 40, 25
    scores = torch.rand(users, items, generator=gen)  # continuous: no ties
    targets = torch.randint(0, items, (users,), generator=gen)
    mine = ranking_metrics(target_ranks(scores, targets), ks=(5, 10))
    relevant = torch.zeros(users, items, dtype=torch.bool)
    relevant[torch.arange(users), targets] = True
    indexes = torch.arange(users).unsqueeze(1).expand(users, items)
    for k in (5, 10):
        for name, metric in (("ndcg", RetrievalNormalizedDCG(top_k=k)), ("hr", RetrievalHitRate(top_k=k)),
                             ("mrr", RetrievalMRR(top_k=k))):
            theirs = metric(scores.flatten(), relevant.flatten(), indexes=indexes.flatten())
            assert mine[f"{name}@{k}"] == pytest.approx(float(theirs), abs=1e-6), (name, k)


# --- beyond accuracy ----------------------------------------------------------------------

from distrec import metrics as M  # noqa: E402


def test_ild_orthogonal_and_identical():
    vectors = torch.eye(4)
    assert M.intra_list_diversity(torch.tensor([[0, 1, 2]]), vectors) == pytest.approx(1.0)
    same = torch.ones(4, 3)
    assert M.intra_list_diversity(torch.tensor([[0, 1, 2]]), same) == pytest.approx(0.0)
    # two users: a list of cos 0.5 pairs -> 0.5
    v = torch.tensor([[1.0, 0.0], [0.5, 3 ** 0.5 / 2]])
    assert M.intra_list_diversity(torch.tensor([[0, 1]]), v) == pytest.approx(0.5)


def test_category_jaccard_ild():
    cats = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    # pairs: (0,1) J=1/2, (0,2) J=0, (1,2) J=0 -> mean 1/6 -> ILD 5/6
    assert M.category_ild(torch.tensor([[0, 1, 2]]), cats) == pytest.approx(5 / 6)


def test_coverages_gini_novelty():
    lists = torch.tensor([[0, 1], [0, 2]])
    primary = torch.tensor([0, 0, 1, -1])
    assert M.category_coverage(lists, primary, num_categories=5) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert M.catalog_coverage(lists, 4) == 0.75
    assert M.gini(torch.tensor([5, 5, 5, 5])) == 0.0
    assert M.gini(torch.tensor([0, 0, 0, 8])) == pytest.approx(3 / 4)  # (n - 1) / n
    assert M.gini(M.exposure(lists, 4)) == pytest.approx(M.gini(torch.tensor([2, 1, 1, 0])))
    counts = torch.tensor([6, 2, 0, 0])  # shares (c + 1) / 12
    expected = -(torch.log2(torch.tensor([7 / 12, 3 / 12, 7 / 12, 1 / 12]))).mean()
    assert M.novelty(lists, counts) == pytest.approx(float(expected))


def test_calibration_kl_textbook():
    lists = torch.tensor([[0, 1]])
    primary = torch.tensor([0, 0, 1])
    p = torch.tensor([[0.5, 0.5]])
    # q = (1, 0) -> q~ = (0.995, 0.005): KL = .5 ln(.5/.995) + .5 ln(.5/.005)
    expected = 0.5 * math.log(0.5 / 0.995) + 0.5 * math.log(0.5 / 0.005)
    assert M.calibration_kl(lists, primary, p) == pytest.approx(expected)
    assert M.calibration_kl(torch.tensor([[0, 2]]), primary, p) == pytest.approx(0.0)


def test_alpha_ndcg_perfect_and_redundant_lists():
    primary = torch.tensor([0, 1, 0, 1, 2])
    profile = torch.tensor([[0.5, 0.5, 0.0]])  # intents: categories 0 and 1
    assert M.alpha_ndcg(torch.tensor([[0, 1, 2, 3]]), primary, profile) == pytest.approx(1.0)
    redundant = M.alpha_ndcg(torch.tensor([[0, 2, 1, 3]]), primary, profile)
    d = [1 / math.log2(r + 2) for r in range(4)]
    ideal = d[0] + d[1] + 0.5 * d[2] + 0.5 * d[3]
    assert redundant == pytest.approx((d[0] + 0.5 * d[1] + d[2] + 0.5 * d[3]) / ideal)
    assert M.alpha_ndcg(torch.tensor([[4, 4, 4, 4]]), primary, profile) == 0.0


# --- over no users, and how far a mean over few users can be trusted -----------------------

def test_metrics_over_no_users_are_undefined_not_zero():
    empty = ranking_metrics(torch.tensor([], dtype=torch.float64), ks=(10,), none_if_empty=True)
    assert empty == {"ndcg@10": None, "hr@10": None, "mrr@10": None, "users": 0}
    assert ranking_metrics(torch.tensor([], dtype=torch.float64), ks=(10,))["ndcg@10"] == 0.0  # the default is kept
    assert ranking_metrics(torch.tensor([1.0]), ks=(10,), none_if_empty=True)["hr@10"] == 1.0


def test_interval_half_width_textbook():
    values = torch.tensor([0.0, 1.0, 0.0, 1.0])  # sample sd = sqrt(1/3)
    assert M.interval_half_width(values) == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert M.interval_half_width(torch.tensor([0.5])) is None
    assert M.interval_half_width(torch.ones(50)) == 0.0
