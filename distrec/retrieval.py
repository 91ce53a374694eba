"""The first stage: each user's top-N of the whole catalog under a trained run, seen items
excluded, the most popular items for a user with nothing to go on. The scoring job's actors
and `evaluate --sweep` both retrieve through it (neither imports the other)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from distrec.data.shards import left_pad
from distrec.models.run import load_model
from distrec.score.faiss_topk import FaissTopK
from distrec.score.kernel import top_candidates


class Retriever:
    """`table` (num_items, d): the catalog's item vectors (distrec.catalog.catalog_vectors);
    `popularity` (num_items,): the fill for empty histories. On `device` (a GPU actor's) the
    user tower and the product run there; the results come back to the CPU."""

    def __init__(self, run: str | Path, items: pd.DataFrame, table: torch.Tensor, popularity: torch.Tensor,
                 candidates: int, precision: str = "auto", device: str = "cpu", faiss: bool = False):
        self.candidates, self.precision = candidates, precision
        self.model = load_model(Path(run) / "best", items, Path(run) / "tokenizer")
        self.device = torch.device(device)
        # only the user tower: scoring reads the item vectors from the catalog table, so the
        # backbone and its pooled cache (GBs for a large catalog and LM) stay off the GPU
        self.model.eval()
        getattr(self.model, "user_tower", self.model).to(self.device)
        self.table, self.popularity = table, popularity
        self.device_table = table.to(self.device)
        self.faiss = FaissTopK(table) if faiss else None

    @torch.no_grad()
    def __call__(self, histories: list):
        """(relevance (B, N), candidates (B, N), users with an empty history, user vectors (B, d))."""
        history = left_pad(histories, 0)
        empty = torch.tensor([len(h) == 0 for h in histories])
        on_device = history.to(self.device)
        user_vectors = self.model.user_vectors(on_device, self.device_table)
        if self.faiss is not None:
            relevance, candidates = self.faiss(user_vectors.cpu(), self.candidates, history)
        else:
            relevance, candidates = top_candidates(user_vectors.float(), self.device_table.float(), self.candidates,
                                                   on_device, precision=self.precision)
            relevance, candidates = relevance.cpu(), candidates.cpu()
        if empty.any():  # nothing to go on: the most popular items
            pop, pop_items = self.popularity.float().topk(min(self.candidates, len(self.popularity)))
            relevance[empty], candidates[empty] = pop, pop_items
        return relevance, candidates, int(empty.sum()), user_vectors
