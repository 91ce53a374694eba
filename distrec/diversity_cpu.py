"""The compiled (numba) CPU kernels of the MMR and DPP policies (distrec.diversity), per user.

Why by hand: greedy DPP is k dependent steps, each a matrix-vector product over the user's
candidates. Vectorised across users in torch, every step streams all users' vectors from
memory again (B x N x d floats per step) and pays a dozen op launches, which on CPU leaves
it memory-bound at a few times the per-user NumPy speed. Compiled per user, a user's
vectors stay in L1/L2 for all k steps. No maintained library ships greedy DPP MAP; numba
is the maintained tool for compiling such loops. Arithmetic in float64, like the reference.

The same picks as the torch paths in distrec.diversity and the brute-force references
(tests/test_diversity.py). `mmr_cpu` and `dpp_cpu` are None without numba.
"""

from __future__ import annotations

import torch

from distrec.compiled import numba, use_torch_threads

if numba is not None:
    import numpy as np
    _REASSOC = {"reassoc", "contract"}  # lets dot products vectorise; no nnan/ninf: -inf marks taken items

    @numba.njit(cache=True)
    def _finite_range(rel):  # pragma: no cover - compiled
        low, high = np.inf, -np.inf
        for r in rel:
            if r != -np.inf:
                low, high = min(low, r), max(high, r)
        return low, high

    @numba.njit(fastmath=_REASSOC, cache=True, inline="always")
    def _dot(a, b):  # pragma: no cover - compiled
        s = a.dtype.type(0.0)
        for x in range(a.shape[0]):
            s += a[x] * b[x]
        return s

    @numba.njit(fastmath=_REASSOC, cache=True)
    def _condition(v, scale, c, d2, e, j, t):  # pragma: no cover - compiled
        """Add pick j as Cholesky row t; update the residuals d2 (Chen et al., lines 5-7).
        L_ij = scale_i scale_j (v_i . v_j) with scale = q / |v|: the user's vectors are read as
        they are (from cache after the first pass), the recursion runs in float64 with the
        candidates innermost so every loop vectorises."""
        n, dim = v.shape
        vj = v[j]
        i = 0
        while i + 4 <= n:  # four rows per pass over v_j: fewer loads and horizontal sums
            s0 = s1 = s2 = s3 = v.dtype.type(0.0)
            for x in range(dim):
                a = vj[x]
                s0 += v[i, x] * a
                s1 += v[i + 1, x] * a
                s2 += v[i + 2, x] * a
                s3 += v[i + 3, x] * a
            e[i], e[i + 1], e[i + 2], e[i + 3] = s0, s1, s2, s3
            i += 4
        for i in range(i, n):
            e[i] = _dot(v[i], vj)
        _finish(scale, c, d2, e, j, t)

    @numba.njit(fastmath=_REASSOC, cache=True, inline="always")
    def _finish(scale, c, d2, e, j, t):  # pragma: no cover - compiled
        n = e.shape[0]
        dj = np.sqrt(max(d2[j], 1e-12))
        sj = scale[j]
        for i in range(n):
            e[i] *= scale[i] * sj
        for x in range(t):
            a = c[x, j]
            for i in range(n):
                e[i] -= c[x, i] * a
        for i in range(n):
            e[i] /= dj
            c[t, i] = e[i]
            d2[i] -= e[i] * e[i]

    @numba.njit(fastmath=_REASSOC, cache=True)
    def _first_condition(v, q, scale, c, d2, e, j):  # pragma: no cover - compiled
        """The first pick's row and every candidate's norm in one pass over the vectors (the
        pass that reads them from memory; later passes hit the cache)."""
        vj = v[j]
        for i in range(v.shape[0]):
            vi = v[i]
            e[i] = _dot(vi, vj)
            scale[i] = q[i] / max(np.sqrt(np.float64(_dot(vi, vi))), 1e-12)
        _finish(scale, c, d2, e, j, 0)

    @numba.njit(parallel=True, cache=True)
    def _dpp_kernel(relevance, vectors, alpha, k, window, eps, out):  # pragma: no cover - compiled
        batch, n, dim = vectors.shape
        for b in numba.prange(batch):
            v, rel = vectors[b], relevance[b]
            low, high = _finite_range(rel)
            q = np.exp(alpha * ((rel - low) / max(high - low, 1e-12)))  # dpp_kernel_quality (0 for padding)
            base = q * q  # L_ii
            for i in range(n):
                if rel[i] == -np.inf:  # padding never adds volume
                    base[i] = -np.inf
            d2 = base.copy()
            c = np.zeros((k, n))  # Cholesky factors, one row per conditioned pick
            e = np.empty(n)
            scale = np.empty(n)
            taken = np.zeros(n, dtype=np.bool_)
            fill = np.empty(0, dtype=np.int64)
            for step in range(k):
                if fill.size == 0:  # not exhausted
                    if window > 0 and step >= window:  # condition on the last window - 1 picks only
                        d2[:] = base
                        for t in range(window - 1):
                            _condition(v, scale, c, d2, e, out[b, step - (window - 1) + t], t)
                    best, best_value = -1, -np.inf
                    for i in range(n):
                        if not taken[i] and d2[i] > best_value:
                            best, best_value = i, d2[i]
                    if best < 0 or best_value < eps * base[best]:  # no volume left: the rest by relevance
                        fill = np.argsort(-rel, kind="mergesort")  # stable: ties to the lower position
                if fill.size:
                    for r in range(n):
                        if not taken[fill[r]]:
                            best = fill[r]
                            break
                out[b, step] = best
                taken[best] = True
                if (window == 0 or step + 1 < window) and step + 1 < k and fill.size == 0:
                    if step == 0:
                        _first_condition(v, q, scale, c, d2, e, best)
                    else:
                        _condition(v, scale, c, d2, e, best, step)

    @numba.njit(fastmath=_REASSOC, cache=True)
    def _mmr_update(v, inv, max_sim, j, first):  # pragma: no cover - compiled
        """max_sim_i = max(max_sim_i, cos(i, j)); the first call also takes the norms."""
        vj = v[j]
        if first:
            for i in range(v.shape[0]):
                inv[i] = 1.0 / max(np.sqrt(np.float64(_dot(v[i], v[i]))), 1e-12)
        for i in range(v.shape[0]):
            sim = np.float64(_dot(v[i], vj)) * inv[i] * inv[j]
            max_sim[i] = sim if first else max(max_sim[i], sim)

    @numba.njit(parallel=True, cache=True)
    def _mmr_kernel(relevance, vectors, lam, k, out):  # pragma: no cover - compiled
        batch, n, dim = vectors.shape
        for b in numba.prange(batch):
            v, rel = vectors[b], relevance[b]
            low, high = _finite_range(rel)
            r = (rel - low) / max(high - low, 1e-12)
            max_sim = np.zeros(n)
            inv = np.empty(n)
            taken = np.zeros(n, dtype=np.bool_)
            for step in range(k):
                best, best_value = -1, -np.inf
                for i in range(n):
                    value = (1.0 - lam) * r[i] - lam * max_sim[i] if rel[i] != -np.inf else -1e30
                    if not taken[i] and value > best_value:
                        best, best_value = i, value
                out[b, step] = best
                taken[best] = True
                if step + 1 < k:
                    _mmr_update(v, inv, max_sim, best, step == 0)

    def _float_vectors(vectors: torch.Tensor) -> np.ndarray:
        vec = vectors.detach()
        return (vec if vec.dtype in (torch.float32, torch.float64) else vec.float()).contiguous().numpy()


    def mmr_cpu(relevance: torch.Tensor, vectors: torch.Tensor, k: int, diversity: float) -> torch.Tensor:
        out = np.empty((relevance.shape[0], k), dtype=np.int64)
        use_torch_threads()
        _mmr_kernel(relevance.detach().double().contiguous().numpy(), _float_vectors(vectors), float(diversity),
                    k, out)
        return torch.from_numpy(out)

    def dpp_cpu(relevance: torch.Tensor, vectors: torch.Tensor, k: int, tradeoff: float, window: int,
                 eps: float) -> torch.Tensor:
        rel = relevance.detach().double().contiguous().numpy()
        out = np.empty((relevance.shape[0], k), dtype=np.int64)
        use_torch_threads()
        _dpp_kernel(rel, _float_vectors(vectors), tradeoff / (2.0 * (1.0 - tradeoff)), k, int(window), float(eps), out)
        return torch.from_numpy(out)
else:
    dpp_cpu = mmr_cpu = None

available = mmr_cpu is not None
