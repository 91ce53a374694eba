"""FAISS `IndexFlatIP` (exact inner product) behind the same contract as
distrec.score.kernel.top_candidates (`faiss=true` in the scoring config), for catalogs where
an index beats the dense product. FAISS cannot skip per-user items, so it returns
n + (longest history) and the seen items are dropped afterwards."""

from __future__ import annotations

import torch

from distrec.score.bf16_bound import NEG


class FaissTopK:
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

