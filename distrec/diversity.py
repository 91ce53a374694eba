"""Diversity re-ranking policies over a batch of users' candidate lists, as pure functions.

Every policy takes the candidates of B users (N each, best relevance first or not) and
returns the positions (B, k) of the k candidates it picks, in order. Inputs:

    relevance   (B, N) float   the model's scores of the candidates
    vectors     (B, N, d)      the candidates' item vectors (any scale: cosine is used)
    categories  (B, N) long    each candidate's category id (-1 = none)

Everything is vectorised across users with torch and runs on any device. Tests check each
policy against a slow per-user reference on random cases (same picks, same order).
Greedy ties go to the lower position (the better-ranked candidate).

A relevance of -inf marks padding, not a candidate (a user whose history leaves fewer than
N unseen items): every policy picks padding only once nothing else is left, by position,
and the scoring job drops it (a user's list is then shorter than k: seen items are never shown).
"""

from __future__ import annotations

import torch

from distrec.diversity_cpu import dpp_cpu, mmr_cpu

NEG = float("-inf")
LAST = -1e30  # the objective of padding: below every real candidate, above taken ones (-inf)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _rescale(relevance: torch.Tensor) -> torch.Tensor:
    """Min-max per user to [0, 1], so a trade-off weight means the same for every user.
    Padding (-inf) is left out of the range and stays -inf."""
    padding = torch.isneginf(relevance)
    low = relevance.masked_fill(padding, float("inf")).min(dim=1, keepdim=True).values
    high = relevance.max(dim=1, keepdim=True).values
    return ((relevance - low) / (high - low).clamp(min=1e-12)).masked_fill(padding, NEG)


def top_k(relevance: torch.Tensor, k: int) -> torch.Tensor:
    """The `none` policy: the k most relevant, ties to the lower position."""
    order = torch.sort(-relevance, dim=1, stable=True).indices
    return order[:, :k]


def mmr(relevance: torch.Tensor, vectors: torch.Tensor, k: int, diversity: float) -> torch.Tensor:
    """Maximal Marginal Relevance (Carbonell & Goldstein 1998): each step picks
    argmax (1 - diversity) * rel_i - diversity * max_{j picked} cos(i, j), rel in [0, 1].
    On CPU tensors a compiled per-user kernel (distrec.diversity_cpu), elsewhere torch across users."""
    if relevance.device.type == "cpu" and mmr_cpu is not None and relevance.shape[0]:
        return mmr_cpu(relevance, vectors, min(k, relevance.shape[1]), diversity)
    return _mmr_torch(relevance, vectors, k, diversity)


def _mmr_torch(relevance: torch.Tensor, vectors: torch.Tensor, k: int, diversity: float) -> torch.Tensor:
    batch, n = relevance.shape
    rel = _rescale(relevance.float())
    padding = torch.isneginf(rel)
    unit = _unit(vectors.float())
    rows = torch.arange(batch, device=relevance.device)
    max_sim = torch.zeros_like(rel)
    taken = torch.zeros_like(rel, dtype=torch.bool)
    picks = []
    for step in range(min(k, n)):
        objective = ((1.0 - diversity) * rel - diversity * max_sim).masked_fill(padding, LAST).masked_fill(taken, NEG)
        pick = objective.argmax(dim=1)
        picks.append(pick)
        taken[rows, pick] = True
        sim = torch.einsum("bnd,bd->bn", unit, unit[rows, pick])
        max_sim = torch.maximum(max_sim, sim) if step else sim
    return torch.stack(picks, dim=1)


def dpp_kernel_quality(relevance: torch.Tensor, tradeoff: float) -> torch.Tensor:
    """q_i = exp(alpha * rel_i), alpha = tradeoff / (2 (1 - tradeoff)) (Chen et al. 2018, eq. 16):
    tradeoff 0 ignores relevance (pure diversity), towards 1 relevance dominates."""
    alpha = tradeoff / (2.0 * (1.0 - tradeoff))
    return torch.exp(alpha * _rescale(relevance.double()))


def dpp(relevance: torch.Tensor, vectors: torch.Tensor, k: int, tradeoff: float, window: int = 0,
        eps: float = 1e-5) -> torch.Tensor:
    """Greedy MAP inference of a DPP (Chen, Zhang, Zhou, NeurIPS 2018, Algorithm 1), batched.

    Kernel L = diag(q) S diag(q) with S the cosine similarity of the item vectors and q from
    `dpp_kernel_quality`. Incremental Cholesky: O(N k^2) per user. `window` > 0 is the
    sliding-window variant for long lists: diversity only against the last `window - 1` picks.
    When no candidate adds volume (d^2 < eps * L_jj: the item lies in the span of the picks),
    the rest of the list is filled by relevance.

    On CPU tensors this runs a compiled per-user kernel (distrec.diversity_cpu) when numba is installed;
    elsewhere (GPU) the same algorithm vectorised across users in torch. Both give the picks
    of the brute-force reference (tests/test_diversity.py).
    """
    k = min(k, relevance.shape[1])
    if relevance.device.type == "cpu" and dpp_cpu is not None and relevance.shape[0]:
        return dpp_cpu(relevance, vectors, k, tradeoff, window, eps)
    return _dpp_torch(relevance, vectors, k, tradeoff, window, eps)


def _dpp_torch(relevance: torch.Tensor, vectors: torch.Tensor, k: int, tradeoff: float, window: int,
               eps: float) -> torch.Tensor:
    batch, n = relevance.shape
    device = relevance.device
    q = dpp_kernel_quality(relevance, tradeoff)
    # similarities in float32 (the bulk of the work), the Cholesky recursion in float64
    unit = _unit(vectors.float())
    rows = torch.arange(batch, device=device)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=device)
    picks: list[torch.Tensor] = []
    fill = top_k(relevance, n)
    c = torch.zeros(batch, n, k, dtype=torch.float64, device=device)  # Cholesky rows, one column per pick

    def kernel_row(j: torch.Tensor) -> torch.Tensor:  # L[b, j, :]
        sim = torch.bmm(unit, unit[rows, j].unsqueeze(2)).squeeze(2).double()
        return q[rows, j].unsqueeze(1) * q * sim

    def condition(d2: torch.Tensor, j: torch.Tensor, t: int) -> torch.Tensor:
        """Add pick j as Cholesky column t; return the new residuals d^2."""
        d_j = d2[rows, j].clamp(min=1e-12).sqrt()
        e = (kernel_row(j) - torch.bmm(c[:, :, :t], c[rows, j, :t].unsqueeze(2)).squeeze(2)) / d_j.unsqueeze(1)
        c[:, :, t] = e
        return d2 - e * e

    base = (q * q).masked_fill(torch.isneginf(relevance), NEG)  # L_ii (S_ii = 1); padding never adds volume
    d2 = base
    exhausted = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(k):
        if window and step >= window:  # condition on the last window - 1 picks only
            d2 = base
            for t, j in enumerate(picks[len(picks) - (window - 1):] if window > 1 else []):
                d2 = condition(d2, j, t)
        score = d2.masked_fill(taken, NEG)
        pick = score.argmax(dim=1)
        exhausted |= score[rows, pick] < eps * q[rows, pick] ** 2
        if exhausted.any():  # no volume left: next best by relevance among the untaken
            first_free = (~taken.gather(1, fill)).float().argmax(dim=1)
            pick = torch.where(exhausted, fill[rows, first_free], pick)
        picks.append(pick)
        taken[rows, pick] = True
        if not window or step + 1 < window:
            d2 = condition(d2, pick, step)
    return torch.stack(picks, dim=1)


def category_cap(relevance: torch.Tensor, categories: torch.Tensor, k: int, cap: int) -> torch.Tensor:
    """At most `cap` items of one category in the top k, picked by relevance. If every
    remaining candidate is capped, the list is filled by relevance (never short)."""
    batch, n = relevance.shape
    rows = torch.arange(batch, device=relevance.device)
    num_categories = int(categories.max().item()) + 2 if categories.numel() else 1
    cat = torch.where(categories < 0, num_categories - 1, categories)  # -1 -> its own uncapped bucket
    counts = torch.zeros(batch, num_categories, dtype=torch.long, device=relevance.device)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=relevance.device)
    padding = torch.isneginf(relevance)
    rel = relevance.float().masked_fill(padding, LAST)
    picks = []
    for _ in range(min(k, n)):
        capped = (counts.gather(1, cat) >= cap) & (categories >= 0)
        allowed = rel.masked_fill(taken | capped | padding, NEG)  # then capped items, then padding
        fallback = rel.masked_fill(taken, NEG)
        none_left = torch.isinf(allowed.max(dim=1).values)
        pick = torch.where(none_left, fallback.argmax(dim=1), allowed.argmax(dim=1))
        picks.append(pick)
        taken[rows, pick] = True
        counts[rows, cat[rows, pick]] += 1
    return torch.stack(picks, dim=1)


def calibration(relevance: torch.Tensor, categories: torch.Tensor, profile: torch.Tensor, k: int,
               weight: float, smoothing: float = 0.01) -> torch.Tensor:
    """Calibration to the user's category mix (Steck, RecSys 2018), greedy: each step picks
    argmax (1 - weight) * sum rel(S + i) - weight * KL(p || q~(S + i)), with q the category
    distribution of the list, q~ = (1 - a) q + a p, rel in [0, 1]; `profile` p (B, C) sums to 1.
    Candidates without a category (-1) add no category mass."""
    batch, n = relevance.shape
    num_categories = profile.shape[1]
    rows = torch.arange(batch, device=relevance.device)
    rel = _rescale(relevance.double())
    padding = torch.isneginf(rel)
    p = profile.double()
    onehot = torch.zeros(batch, n, num_categories, dtype=torch.float64, device=relevance.device)
    valid = categories >= 0
    onehot[valid.nonzero(as_tuple=True) + (categories[valid],)] = 1.0
    list_counts = torch.zeros(batch, num_categories, dtype=torch.float64, device=relevance.device)
    rel_sum = torch.zeros(batch, dtype=torch.float64, device=relevance.device)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=relevance.device)
    picks = []
    for step in range(min(k, n)):
        counts = list_counts.unsqueeze(1) + onehot  # (B, N, C): the list if i joins
        total = counts.sum(dim=2, keepdim=True)
        q = torch.where(total > 0, counts / total.clamp(min=1e-12), torch.zeros_like(counts))
        q_smooth = (1.0 - smoothing) * q + smoothing * p.unsqueeze(1)
        terms = torch.where(p.unsqueeze(1) > 0, p.unsqueeze(1) * torch.log(p.unsqueeze(1) / q_smooth),
                            torch.zeros_like(q_smooth))
        kl = terms.sum(dim=2)
        objective = ((1.0 - weight) * (rel_sum.unsqueeze(1) + rel) - weight * kl)
        objective = objective.masked_fill(padding, LAST).masked_fill(taken, NEG)
        pick = objective.argmax(dim=1)
        picks.append(pick)
        taken[rows, pick] = True
        list_counts += onehot[rows, pick]
        rel_sum += rel[rows, pick]
    return torch.stack(picks, dim=1)


def exposure(relevance: torch.Tensor, items: torch.Tensor, k: int, capacity: int,
                    shown: torch.Tensor, filled: torch.Tensor | None = None) -> torch.Tensor:
    """A catalog-level constraint across users: no item in more than `capacity` lists, as far
    as the candidates allow. Users are served in batch order; each gets its k most relevant
    candidates among the items still under capacity. A user with fewer than k of those gets
    the most relevant candidates at or over capacity next (the fill: the list is not made
    shorter for the cap), padding (-inf) last. `shown` (num_items,) long holds exposure
    counts so far and is updated in place by the real picks (padding is never shown).
    `filled` (B,) bool, if given, is set in place: whether the user's list took an item
    that was at or over capacity (the users the cap could not be kept for)."""
    batch, n = relevance.shape
    picks = torch.empty(batch, min(k, n), dtype=torch.long, device=relevance.device)
    order = top_k(relevance, n)
    for b in range(batch):
        ranked = order[b]
        padding = torch.isneginf(relevance[b, ranked])
        over = (shown[items[b, ranked]] >= capacity) & ~padding
        free = ~(over | padding)
        chosen = torch.cat([ranked[free], ranked[over], ranked[padding]])[: picks.shape[1]]
        picks[b] = chosen
        real = chosen[~torch.isneginf(relevance[b, chosen])]
        if filled is not None:
            filled[b] = bool((shown[items[b, real]] >= capacity).any())
        shown[items[b, real]] += 1
    return picks


def category_profile(histories: list, item_categories: torch.Tensor, num_categories: int) -> torch.Tensor:
    """(B, C) each user's category distribution over their history (uniform if empty)."""
    profile = torch.zeros(len(histories), num_categories, dtype=torch.float64)
    for row, history in enumerate(histories):
        cats = item_categories[torch.tensor(list(history), dtype=torch.long)] if len(history) else torch.empty(0)
        cats = cats[cats >= 0]
        if len(cats):
            profile[row] = torch.bincount(cats, minlength=num_categories).double()
        else:
            profile[row] = 1.0
    return profile / profile.sum(dim=1, keepdim=True)
