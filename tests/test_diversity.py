"""Each diversity policy against a slow, obviously-correct per-user reference on random
cases: the same picks in the same order."""

import numpy as np
import pytest
import torch

from distrec import diversity, diversity_cpu

CASES = [(seed, batch, n, d) for seed, (batch, n, d) in enumerate([(3, 12, 4), (5, 30, 8), (2, 50, 16), (4, 20, 3)])]


def _case(seed, batch, n, d, num_categories=4):
    gen = torch.Generator().manual_seed(seed)
    relevance = torch.randn(batch, n, generator=gen)
    vectors = torch.randn(batch, n, d, generator=gen)
    categories = torch.randint(-1, num_categories, (batch, n), generator=gen)
    return relevance, vectors, categories


def _rescale(r):
    return (r - r.min()) / max(r.max() - r.min(), 1e-12)


def _cos(v):
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    return u @ u.T


# --- references: one user at a time, straight from the definitions --------------------

def mmr_reference(rel, vec, k, lam):
    rel, sim, picked = _rescale(rel), _cos(vec), []
    for _ in range(k):
        best, best_value = None, -np.inf
        for i in range(len(rel)):
            if i in picked:
                continue
            value = (1 - lam) * rel[i] - lam * max((sim[i, j] for j in picked), default=0.0)
            if value > best_value:
                best, best_value = i, value
        picked.append(best)
    return picked


def dpp_reference(rel, vec, k, tradeoff, window=0):
    """Greedy MAP by brute force: each step adds the item maximising det(L_{S + i})."""
    alpha = tradeoff / (2 * (1 - tradeoff))
    q = np.exp(alpha * _rescale(rel))
    kernel = q[:, None] * _cos(vec) * q[None, :]
    picked = []
    for _ in range(k):
        context = picked[-(window - 1):] if window and window > 1 else ([] if window == 1 else picked)
        best, best_value = None, -np.inf
        for i in range(len(rel)):
            if i in picked:
                continue
            chosen = context + [i]
            value = np.linalg.det(kernel[np.ix_(chosen, chosen)])
            if value > best_value:
                best, best_value = i, value
        picked.append(best)
    return picked


def cap_reference(rel, cats, k, cap):
    picked, counts = [], {}
    for _ in range(k):
        order = sorted((i for i in range(len(rel)) if i not in picked), key=lambda i: -rel[i])
        allowed = [i for i in order if cats[i] < 0 or counts.get(cats[i], 0) < cap]
        pick = (allowed or order)[0]
        picked.append(pick)
        counts[cats[pick]] = counts.get(cats[pick], 0) + 1
    return picked


def calibration_reference(rel, cats, profile, k, weight, a=0.01):
    rel = _rescale(rel)
    picked = []
    for _ in range(k):
        best, best_value = None, -np.inf
        for i in range(len(rel)):
            if i in picked:
                continue
            chosen = picked + [i]
            q = np.zeros(len(profile))
            for j in chosen:
                if cats[j] >= 0:
                    q[cats[j]] += 1
            q = q / q.sum() if q.sum() else q
            q = (1 - a) * q + a * profile
            kl = sum(p * np.log(p / qc) for p, qc in zip(profile, q) if p > 0)
            value = (1 - weight) * rel[chosen].sum() - weight * kl
            if value > best_value:
                best, best_value = i, value
        picked.append(best)
    return picked


# --- the checks ------------------------------------------------------------------------

MMR_PATHS = {"default": diversity.mmr, "torch": diversity._mmr_torch}


@pytest.mark.parametrize("path", MMR_PATHS)
@pytest.mark.parametrize("seed, batch, n, d", CASES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7])
def test_mmr(path, seed, batch, n, d, lam):
    relevance, vectors, _ = _case(seed, batch, n, d)
    picks = MMR_PATHS[path](relevance, vectors, 6, lam)
    for b in range(batch):
        assert picks[b].tolist() == mmr_reference(relevance[b].numpy(), vectors[b].numpy(), 6, lam)


DPP_PATHS = {"default": diversity.dpp,  # the compiled kernel on CPU
             "torch": lambda r, v, k, t, w=0: diversity._dpp_torch(r, v, min(k, r.shape[1]), t, w, 1e-5)}


@pytest.mark.parametrize("path", DPP_PATHS)
@pytest.mark.parametrize("seed, batch, n, d", CASES)
@pytest.mark.parametrize("tradeoff, window", [(0.5, 0), (0.9, 0), (0.2, 0), (0.7, 3), (0.7, 1)])
def test_dpp(path, seed, batch, n, d, tradeoff, window):
    relevance, vectors, _ = _case(seed, batch, n, d)
    k = min(d, 6) if not window else 6  # a full-rank kernel can hold at most d items
    picks = DPP_PATHS[path](relevance, vectors, k, tradeoff, window)
    for b in range(batch):
        assert picks[b].tolist() == dpp_reference(relevance[b].double().numpy(), vectors[b].double().numpy(), k,
                                                  tradeoff, window)


def test_cpu_paths_are_the_compiled_kernels(monkeypatch):
    """mmr and dpp on CPU tensors run the numba kernels (the torch loops only on GPUs): with
    the torch paths made to fail, the CPU calls still answer, and the kernels hold compiled code."""
    def torch_path(*args, **kwargs):
        raise AssertionError("the CPU call took the torch path")

    monkeypatch.setattr(diversity, "_mmr_torch", torch_path)
    monkeypatch.setattr(diversity, "_dpp_torch", torch_path)
    gen = torch.Generator().manual_seed(3)
    relevance, vectors = torch.randn(4, 30, generator=gen), torch.randn(4, 30, 8, generator=gen)
    assert diversity.mmr(relevance, vectors, 5, 0.3).shape == (4, 5)
    assert diversity.dpp(relevance, vectors, 5, 0.5).shape == (4, 5)
    assert diversity_cpu._mmr_kernel.signatures and diversity_cpu._dpp_kernel.signatures


def test_mmr_compiled_and_torch_paths_agree_on_larger_cases():
    gen = torch.Generator().manual_seed(8)
    relevance, vectors = torch.randn(300, 120, generator=gen), torch.randn(300, 120, 32, generator=gen)
    for k, lam in ((1, 0.3), (10, 0.3), (40, 0.8)):
        assert torch.equal(diversity.mmr(relevance, vectors, k, lam), diversity._mmr_torch(relevance, vectors, k, lam))


@pytest.mark.parametrize("window", [0, 4])
def test_dpp_compiled_and_torch_paths_agree_on_larger_cases(window):
    gen = torch.Generator().manual_seed(7)
    relevance, vectors = torch.randn(300, 120, generator=gen), torch.randn(300, 120, 32, generator=gen)
    for k in (1, 10, 40):
        assert torch.equal(diversity.dpp(relevance, vectors, k, 0.6, window),
                           diversity._dpp_torch(relevance, vectors, k, 0.6, window, 1e-5))


@pytest.mark.parametrize("path", DPP_PATHS)
def test_dpp_fills_by_relevance_once_the_kernel_is_exhausted(path):
    relevance, vectors, _ = _case(0, 2, 10, 2)  # rank 2: only 2 items add volume
    picks = DPP_PATHS[path](relevance, vectors, 5, 0.5)
    assert len(set(picks[0].tolist())) == 5
    rest = [i for i in torch.argsort(relevance[0], descending=True).tolist() if i not in picks[0, :2].tolist()]
    assert picks[0, 2:].tolist() == rest[:3]


@pytest.mark.parametrize("seed, batch, n, d", CASES)
@pytest.mark.parametrize("cap", [1, 2])
def test_category_cap(seed, batch, n, d, cap):
    relevance, _, categories = _case(seed, batch, n, d)
    picks = diversity.category_cap(relevance, categories, 8, cap)
    for b in range(batch):
        assert picks[b].tolist() == cap_reference(relevance[b].numpy(), categories[b].numpy(), 8, cap)


@pytest.mark.parametrize("seed, batch, n, d", CASES)
@pytest.mark.parametrize("weight", [0.0, 0.5, 0.95])
def test_calibration(seed, batch, n, d, weight):
    relevance, _, categories = _case(seed, batch, n, d)
    gen = torch.Generator().manual_seed(seed + 100)
    profile = torch.rand(batch, 4, generator=gen)
    profile[:, 0] = 0.0  # a category the user never saw
    profile = profile / profile.sum(dim=1, keepdim=True)
    picks = diversity.calibration(relevance, categories, profile, 6, weight)
    for b in range(batch):
        assert picks[b].tolist() == calibration_reference(relevance[b].double().numpy(), categories[b].numpy(),
                                                          profile[b].double().numpy(), 6, weight)


def test_exposure_cap_serves_users_in_order_and_never_exceeds_capacity():
    gen = torch.Generator().manual_seed(3)
    items = torch.stack([torch.randperm(20, generator=gen)[:10] for _ in range(8)])
    relevance = torch.randn(8, 10, generator=gen)
    shown = torch.zeros(20, dtype=torch.long)
    picks = diversity.exposure(relevance, items, 3, capacity=2, shown=shown)
    reference, counts = [], {}
    for b in range(8):
        order = sorted(range(10), key=lambda i: -relevance[b, i].item())
        free = [i for i in order if counts.get(items[b, i].item(), 0) < 2]
        chosen = (free + [i for i in order if i not in free])[:3]
        for i in chosen:
            counts[items[b, i].item()] = counts.get(items[b, i].item(), 0) + 1
        reference.append(chosen)
    assert picks.tolist() == reference
    assert shown.max().item() <= 2 and shown.sum().item() == 24


def test_none_is_top_k_with_ties_to_the_better_position():
    relevance = torch.tensor([[0.5, 0.9, 0.5, 0.1]])
    assert diversity.top_k(relevance, 3).tolist() == [[1, 0, 2]]


def test_strength_zero_is_plain_relevance():
    relevance, vectors, categories = _case(7, 4, 25, 8)
    expected = diversity.top_k(relevance, 5)
    assert torch.equal(diversity.mmr(relevance, vectors, 5, 0.0), expected)
    assert torch.equal(diversity.category_cap(relevance, categories, 5, 5), expected)
    profile = torch.full((4, 4), 0.25)
    assert torch.equal(diversity.calibration(relevance, categories, profile, 5, 0.0), expected)


def test_category_profile():
    item_categories = torch.tensor([0, 1, 1, -1])
    profile = diversity.category_profile([[0, 1, 2, 3], []], item_categories, 2)
    assert profile.tolist() == [[1 / 3, 2 / 3], [0.5, 0.5]]


PADDED_POLICIES = {
    "top_k": lambda r, v, c, p, k: diversity.top_k(r, k),
    "mmr": lambda r, v, c, p, k: diversity.mmr(r, v, k, 0.4),
    "mmr_torch": lambda r, v, c, p, k: diversity._mmr_torch(r, v, k, 0.4),
    "dpp": lambda r, v, c, p, k: diversity.dpp(r, v, k, 0.6),
    "dpp_torch": lambda r, v, c, p, k: diversity._dpp_torch(r, v, min(k, r.shape[1]), 0.6, 0, 1e-5),
    "dpp_window": lambda r, v, c, p, k: diversity.dpp(r, v, k, 0.6, 3),
    "category_cap": lambda r, v, c, p, k: diversity.category_cap(r, c, k, 1),
    "calibration": lambda r, v, c, p, k: diversity.calibration(r, c, p, k, 0.5),
}


@pytest.mark.parametrize("name", PADDED_POLICIES)
@pytest.mark.parametrize("k", [4, 9])
def test_padding_is_picked_last_and_changes_nothing_else(name, k):
    """-inf relevance marks padding (fewer unseen items than candidates): a user's picks are
    those of the same policy on the real candidates alone, then the padding by position."""
    policy = PADDED_POLICIES[name]
    relevance, vectors, categories = _case(11, 4, 12, 6)
    profile = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), dim=1).double()
    padded = relevance.clone()
    pad = torch.zeros_like(relevance, dtype=torch.bool)
    pad[:, [1, 5, 6, 10, 11]] = True  # 7 real candidates
    padded[pad] = float("-inf")
    picks = policy(padded, vectors, categories, profile, k)
    for b in range(4):
        real = (~pad[b]).nonzero().squeeze(1)
        alone = policy(relevance[b:b + 1, real], vectors[b:b + 1, real], categories[b:b + 1, real],
                       profile[b:b + 1], min(k, len(real)))[0]
        expected = real[alone].tolist() + pad[b].nonzero().squeeze(1).tolist()[: max(0, k - len(real))]
        assert picks[b].tolist() == expected


def test_exposure_cap_prefers_full_items_to_padding():
    relevance = torch.tensor([[3.0, float("-inf"), 2.0, 1.0]])
    items = torch.tensor([[0, 1, 2, 3]])
    shown = torch.tensor([0, 0, 5, 5])
    picks = diversity.exposure(relevance, items, 4, 5, shown)
    assert picks[0].tolist() == [0, 2, 3, 1]


def test_exposure_cap_counts_only_what_is_shown_and_says_who_was_filled_over_it():
    """Padding (-inf: a seen item) is never shown, so it takes none of an item's capacity;
    `filled` marks the users whose list had to take an item at or over the cap."""
    relevance = torch.tensor([[3.0, float("-inf"), 2.0, 1.0],
                              [1.0, 2.0, float("-inf"), float("-inf")],
                              [5.0, 4.0, 3.0, 2.0]])
    items = torch.tensor([[0, 1, 2, 3], [0, 3, 1, 2], [0, 1, 2, 3]])
    shown = torch.tensor([0, 0, 1, 0])
    filled = torch.zeros(3, dtype=torch.bool)
    picks = diversity.exposure(relevance, items, 3, 1, shown, filled)
    # user 0: items 0 and 3 are free, item 2 full; the padded item 1 is left out of the counts
    # user 1: items 3 and 0 are full now, so it is filled over the cap; its padding stays last
    # user 2: only item 1 is free (it was padding so far), then the most relevant full ones
    assert picks.tolist() == [[0, 3, 2], [1, 0, 2], [1, 0, 2]]
    assert shown.tolist() == [3, 1, 3, 2]
    assert filled.tolist() == [True, True, True]
    shown = torch.zeros(4, dtype=torch.long)
    filled = torch.ones(1, dtype=torch.bool)
    diversity.exposure(relevance[:1], items[:1], 2, 1, shown, filled)
    assert not filled.item() and shown.tolist() == [1, 0, 1, 0]
