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
