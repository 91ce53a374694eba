"""Why a bf16 product can pick the candidates and the answer still be the exact fp32 top n:
the rounding bound both scoring paths check per user (distrec.score.kernel_cpu for CPUs with
bf16 matrix units, distrec.score.kernel_torch for GPUs), the catalog facts it needs, and the
count of users it could not settle (scored again in fp32)."""

from __future__ import annotations

import torch

# Below this many item-dims the bf16 path's fixed work per user (a larger heap, the fp32
# rescoring of its candidates) outweighs the faster product. Measured per user, 1,024 users,
# fp32 vs bf16: 200k x 64: 132 vs 147 us; 100k x 128: 109 vs 113; 300k x 64: 206 vs 196;
# 65,536 x 256: 130 vs 119; 1M x 64: 1.3x faster in bf16; 1M x 256: 2.5-2.8x.
BF16_MIN_SIZE = 2**24
NEG = float("-inf")  # the score of an excluded (seen) item, in every path
BF16_SPARE = 64  # candidates kept beyond 2 n (1M items, random vectors: 99.9% of users settled at n + 128)
STATS = {"bf16_users": 0, "fp32_again": 0}  # users scored from bf16 candidates, and of those scored again in fp32


def cannot_overflow(users, facts) -> bool:
    return float(users.float().norm(dim=1).max()) * facts["max_norm"] < 1e30


def bound(users: torch.Tensor, dim: int, max_norm: float) -> torch.Tensor:
    """(B,) float64: how far rounding can move a score, per user (kernel_cpu.top_candidates_bf16)."""
    norms = users.double().norm(dim=1)
    return (1.05 * (2.0**-7 + 2.0**-16 + 2 * dim * 2.0**-24) * max_norm * norms
            + 2.0**-126 * (dim * (norms + max_norm + 1) + 1))


_catalog_cache: dict = {}


def catalog_facts(table: torch.Tensor) -> dict:
    """Whether the catalog is finite, its largest row norm and (filled by the bf16 path) its
    bf16 copy, kept for the catalog in use: the scoring job passes one table for every batch.
    The same tensor object, not modified since; holding it keeps its memory from being reused,
    and one dict swapped in whole keeps threads scoring side by side from mixing entries.
    A catalog changed in place through a NumPy view is not noticed: pass a new tensor."""
    inference = table.is_inference()  # no version counter: checked on every call
    entry = None if inference else _catalog_cache.get("entry")
    if entry is None or entry["source"] is not table or entry["version"] != table._version:
        entry = {"source": table, "version": None if inference else table._version, "bf16": None,
                 "finite": bool(torch.isfinite(table).all()),
                 "max_norm": float(table.norm(dim=1).max()) if len(table) else 0.0}
        if not inference:
            _catalog_cache["entry"] = entry
    return entry

