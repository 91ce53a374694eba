"""Full-catalog top-N for a batch of users without holding the (users x catalog) matrix.

The catalog is scored in blocks; each block's top-N merges into a running top-N, so
memory is O(users x (block + N)) whatever the catalog size. Items in a user's history
get -inf (PROTOCOL.md: seen items are never recommended).
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def mask_history(scores: torch.Tensor, history: torch.Tensor, start: int) -> None:
    """In place: -inf for history items (B, L; -1 = padding) that fall in [start, start + width)."""
    width = scores.shape[1]
    inside = (history >= start) & (history < start + width)
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(history)
    scores[rows[inside], history[inside] - start] = NEG


@torch.no_grad()
def top_candidates(users: torch.Tensor, table: torch.Tensor, n: int, history: torch.Tensor | None = None,
                   block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, items), each (B, n), best first: the n highest dot products of each user
    (B, d) with the catalog (N, d), history items excluded."""
    n = min(n, table.shape[0])
    best_scores = torch.full((users.shape[0], 0), NEG, dtype=users.dtype, device=users.device)
    best_items = torch.zeros((users.shape[0], 0), dtype=torch.long, device=users.device)
    for start in range(0, table.shape[0], block):
        scores = users @ table[start:start + block].T
        if history is not None:
            mask_history(scores, history, start)
        values, index = scores.topk(min(n, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, values], dim=1)
        best_items = torch.cat([best_items, index + start], dim=1)
        if best_scores.shape[1] > n:
            best_scores, keep = best_scores.topk(n, dim=1)
            best_items = best_items.gather(1, keep)
    return best_scores, best_items


class FaissTopK:
    """The same contract with FAISS `IndexFlatIP` (exact inner product), for catalogs where
    an index beats the dense product. FAISS cannot skip per-user items, so it returns
    n + (longest history) and the seen items are dropped afterwards."""

    def __init__(self, table: torch.Tensor):
        import faiss

        self.index = faiss.IndexFlatIP(table.shape[1])
        self.index.add(table.float().contiguous().numpy())

    def __call__(self, users: torch.Tensor, n: int, history: torch.Tensor | None = None):
        extra = int((history >= 0).sum(dim=1).max()) if history is not None else 0
        width = min(n + extra, self.index.ntotal)
        scores, items = self.index.search(users.float().contiguous().numpy(), width)
        scores, items = torch.from_numpy(scores), torch.from_numpy(items).long()
        if history is not None:
            seen = (items.unsqueeze(2) == history.unsqueeze(1)).any(dim=2)
            scores = scores.masked_fill(seen, NEG)
            order = torch.sort(-scores, dim=1, stable=True).indices
            scores, items = scores.gather(1, order), items.gather(1, order)
        return scores[:, :n], items[:, :n]
