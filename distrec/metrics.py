"""Full-ranking accuracy metrics, as pure functions (PROTOCOL.md).

A target's rank counts every rankable item with a strictly higher score, plus the
expected position among the items with an equal score: a model that scores everything
equal gets the metric of a random ranking, never a perfect one. Items in the user's
history are excluded (score -inf) except the target itself.
"""

from __future__ import annotations

import torch

KS = (5, 10, 20)


def exclude_history(scores: torch.Tensor, history: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Set the scores of history items (B, L; -1 = padding) to -inf, keeping each target's score.

    scores: (B, N) float; returns a new tensor.
    """
    scores = scores.clone()
    valid = history >= 0
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(history)
    kept = scores.gather(1, targets.view(-1, 1)) if targets is not None else None
    scores[rows[valid], history[valid]] = float("-inf")
    if targets is not None:
        scores.scatter_(1, targets.view(-1, 1), kept)
    return scores


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Expected 1-based rank of each target among the row's scores. scores (B, N), targets (B,)."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    higher = (scores > target_scores).sum(dim=1)
    equal = (scores == target_scores).sum(dim=1)  # includes the target itself
    return higher.double() + (equal.double() + 1.0) / 2.0


def hit_rate(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """HR@k = Recall@k with one target: 1 if rank <= k. Fractional ranks (ties) count by the
    expected rank, so a tie straddling k is a miss only as often as a random order would be."""
    return (ranks <= k).double()


def ndcg(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k with one target: 1 / log2(rank + 1) if rank <= k."""
    return torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))


def mrr(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """MRR@k with one target: 1 / rank if rank <= k."""
    return torch.where(ranks <= k, 1.0 / ranks, torch.zeros_like(ranks))


def ranking_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """Mean NDCG, HR (= Recall) and MRR at each k over all users of `ranks` (unscored
    users must be passed as rank +inf so they count as misses)."""
    out = {}
    n = max(len(ranks), 1)
    for k in ks:
        out[f"ndcg@{k}"] = float(ndcg(ranks, k).sum()) / n
        out[f"hr@{k}"] = float(hit_rate(ranks, k).sum()) / n
        out[f"mrr@{k}"] = float(mrr(ranks, k).sum()) / n
    out["users"] = len(ranks)
    return out

