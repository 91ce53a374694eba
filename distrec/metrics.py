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


def ranking_metrics(ranks: torch.Tensor, ks=KS, none_if_empty: bool = False) -> dict[str, float | None]:
    """Mean NDCG, HR (= Recall) and MRR at each k over all users of `ranks` (unscored
    users must be passed as rank +inf so they count as misses). Over no users at all the
    means are undefined: None with `none_if_empty` (a slice of 0 users is not a score of 0)."""
    out = {}
    n = max(len(ranks), 1)
    empty = none_if_empty and len(ranks) == 0
    for k in ks:
        out[f"ndcg@{k}"] = None if empty else float(ndcg(ranks, k).sum()) / n
        out[f"hr@{k}"] = None if empty else float(hit_rate(ranks, k).sum()) / n
        out[f"mrr@{k}"] = None if empty else float(mrr(ranks, k).sum()) / n
    out["users"] = len(ranks)
    return out


def interval_half_width(values: torch.Tensor, z: float = 1.96) -> float | None:
    """Half-width of the 95% interval of the mean of per-user values (normal approximation:
    z x sample standard deviation / sqrt(n)); None for fewer than 2 users."""
    n = len(values)
    if n < 2:
        return None
    return float(z * values.double().std(unbiased=True) / n ** 0.5)



# --- beyond accuracy, over final lists (U, K) of item indices ---------------------------

def intra_list_diversity(lists: torch.Tensor, item_vectors: torch.Tensor) -> float:
    """ILD@K: mean over users of 1 - mean pairwise cosine similarity of the list's items."""
    unit = item_vectors.double()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp(min=1e-12)
    v = unit[lists]  # (U, K, d)
    sim = v @ v.transpose(1, 2)
    k = lists.shape[1]
    pairs = k * (k - 1)
    off_diagonal = (sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=1)) / max(pairs, 1)
    return float((1.0 - off_diagonal).mean())


def category_ild(lists: torch.Tensor, item_categories: torch.Tensor) -> float:
    """ILD@K with category Jaccard distance (model-independent); item_categories (I, C) 0/1."""
    sets = item_categories.double()[lists]  # (U, K, C)
    inter = sets @ sets.transpose(1, 2)
    sizes = sets.sum(dim=2)
    union = sizes.unsqueeze(2) + sizes.unsqueeze(1) - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(inter))
    k = lists.shape[1]
    mean_sim = (jaccard.sum(dim=(1, 2)) - jaccard.diagonal(dim1=1, dim2=2).sum(dim=1)) / max(k * (k - 1), 1)
    return float((1.0 - mean_sim).mean())


def category_coverage(lists: torch.Tensor, primary: torch.Tensor, num_categories: int) -> float:
    """Distinct categories in a list / min(K, number of categories), averaged over users."""
    cats = primary[lists]
    distinct = torch.tensor([len(set(row.tolist()) - {-1}) for row in cats], dtype=torch.float64)
    return float((distinct / min(lists.shape[1], num_categories)).mean())


def catalog_coverage(lists: torch.Tensor, num_items: int) -> float:
    """Distinct items over all lists / catalog size."""
    return len(torch.unique(lists)) / num_items


def exposure(lists: torch.Tensor, num_items: int) -> torch.Tensor:
    return torch.bincount(lists.flatten(), minlength=num_items)


def gini(counts: torch.Tensor) -> float:
    """Gini coefficient of exposure counts over the whole catalog (never shown = 0)."""
    x = torch.sort(counts.double()).values
    n, total = len(x), x.sum()
    if total == 0:
        return 0.0
    index = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * index - n - 1) * x).sum() / (n * total))


def novelty(lists: torch.Tensor, train_counts: torch.Tensor) -> float:
    """Mean over shown items of -log2(training popularity share); the share is add-one
    smoothed so that items training never saw (cold) are finite, and the most novel."""
    counts = train_counts.double()
    share = (counts + 1.0) / (counts.sum() + len(counts))
    return float((-torch.log2(share[lists])).mean())


def calibration_kl(lists: torch.Tensor, primary: torch.Tensor, profiles: torch.Tensor, smoothing: float = 0.01) -> float:
    """Mean over users of KL(p_history || q~_list), q~ = (1 - a) q + a p (Steck 2018)."""
    cats = primary[lists]
    num_categories = profiles.shape[1]
    q = torch.zeros(lists.shape[0], num_categories, dtype=torch.float64)
    valid = cats >= 0
    q.scatter_add_(1, cats.clamp(min=0), valid.double())
    q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-12)
    p = profiles.double()
    q = (1 - smoothing) * q + smoothing * p
    terms = torch.where(p > 0, p * torch.log(p / q.clamp(min=1e-300)), torch.zeros_like(p))
    return float(terms.sum(dim=1).mean())


def alpha_ndcg(lists: torch.Tensor, primary: torch.Tensor, profiles: torch.Tensor, alpha: float = 0.5) -> float:
    """alpha-NDCG@K with the user's history categories as intents (Clarke et al. 2008): an
    item of an intent category gains (1 - alpha)^(items of that category ranked above it).
    The ideal list takes the intents round-robin (each category assumed to hold K items)."""
    users, k = lists.shape
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    cats = primary[lists]
    total = 0.0
    for u in range(users):
        intents = set((profiles[u] > 0).nonzero().flatten().tolist())
        if not intents:
            continue
        seen: dict[int, int] = {}
        gains = []
        for c in cats[u].tolist():
            if c in intents:
                gains.append((1 - alpha) ** seen.get(c, 0))
                seen[c] = seen.get(c, 0) + 1
            else:
                gains.append(0.0)
        ideal = torch.tensor([(1 - alpha) ** (r // len(intents)) for r in range(k)], dtype=torch.float64)
        total += float((torch.tensor(gains, dtype=torch.float64) * discount).sum() / (ideal * discount).sum())
    return total / users
