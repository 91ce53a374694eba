"""Full-ranking evaluation of a model on a split (validation during training, test at the end).

Users are split over processes with the same number of batches on every rank (ZeRO-3
needs every rank in every forward) and the ranks gathered, so the figures do not depend
on the number of processes.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from distrec.data.shards import left_pad
from distrec.metrics import exclude_history, ranking_metrics, target_ranks


@torch.no_grad()
def split_ranks(model, frame: pd.DataFrame, table: torch.Tensor, accelerator, batch_size: int) -> np.ndarray:
    """Expected rank of every user's target in `frame` (user, history, target), in frame order."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = math.ceil(len(frame) / world)
    mine = frame.iloc[rank * per_rank:(rank + 1) * per_rank]
    steps = math.ceil(per_rank / batch_size)
    device = table.device
    out = torch.full((per_rank,), float("nan"), dtype=torch.float64, device=device)
    for step in range(steps):
        chunk = mine.iloc[step * batch_size:(step + 1) * batch_size]
        if len(chunk) == 0:  # keep in step with the other ranks
            model.user_vectors(torch.full((1, 1), -1, dtype=torch.long, device=device), table)
            continue
        # the whole history: the model reads its last max_len items, but every seen item is
        # excluded from the ranking (PROTOCOL), not only the ones the model reads
        history = left_pad(list(chunk["history"]), 0).to(device)
        targets = torch.tensor(chunk["target"].to_numpy(), dtype=torch.long, device=device)
        with accelerator.autocast():
            users = model.user_vectors(history, table)
        scores = exclude_history(users.float() @ table.float().T, history, targets)
        out[step * batch_size:step * batch_size + len(chunk)] = target_ranks(scores, targets)
    gathered = accelerator.gather(out).cpu().numpy()
    return gathered[:len(frame)]


def split_metrics(model, frame: pd.DataFrame, table: torch.Tensor, accelerator, batch_size: int,
             slices: dict[str, np.ndarray] | None = None) -> dict:
    """Metrics over all users of `frame`, plus one entry per boolean slice mask."""
    ranks = torch.from_numpy(split_ranks(model, frame, table, accelerator, batch_size))
    result = {"all": ranking_metrics(ranks)}
    for name, mask in (slices or {}).items():
        result[name] = ranking_metrics(ranks[torch.from_numpy(np.array(mask, dtype=bool))])
    return result


def candidate_ranks(scores: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Expected 1-based rank of each target among its row's candidates by `scores` (B, C), ties
    as in `target_ranks`; +inf where the target is not a candidate (the retriever missed it: in
    full-ranking terms a miss, PROTOCOL)."""
    is_target = candidates == targets.unsqueeze(1)
    found = is_target.any(1)
    column = is_target.float().argmax(1)
    ranks = target_ranks(scores, column)
    return torch.where(found, ranks, torch.full_like(ranks, float("inf")))


@torch.no_grad()
def ranker_ranks(model, frame: pd.DataFrame, accelerator, batch_size: int) -> np.ndarray:
    """Rank of every user's target after the ranker re-orders the retrieval candidates in `frame`
    (user, history, target, candidates), in frame order; split over processes as `split_ranks`."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = math.ceil(len(frame) / world)
    mine = frame.iloc[rank * per_rank:(rank + 1) * per_rank]
    steps = math.ceil(per_rank / batch_size)
    out = torch.full((per_rank,), float("nan"), dtype=torch.float64)
    for step in range(steps):
        chunk = mine.iloc[step * batch_size:(step + 1) * batch_size]
        if len(chunk) == 0:  # keep in step with the other ranks (ZeRO-3: every rank in every forward)
            model.logits([[]], torch.zeros((1, 1), dtype=torch.long))
            continue
        candidates = torch.from_numpy(np.stack(chunk["candidates"].to_numpy()).astype(np.int64))
        targets = torch.tensor(chunk["target"].to_numpy(), dtype=torch.long)
        with accelerator.autocast():
            retrieval = torch.from_numpy(np.stack(chunk["scores"].to_numpy()).astype(np.float32)) \
                if "scores" in chunk else None
            scores = model.logits(list(chunk["history"]), candidates, retrieval).float().cpu()
        out[step * batch_size:step * batch_size + len(chunk)] = candidate_ranks(scores, candidates, targets)
    gathered = accelerator.gather(out.to(accelerator.device)).cpu().numpy()
    return gathered[:len(frame)]


def ranker_metrics(model, frame: pd.DataFrame, accelerator, batch_size: int,
                   slices: dict[str, np.ndarray] | None = None) -> dict:
    """`split_metrics` for the ranker: the metrics of the re-ranked candidate lists (a target the
    retriever missed is a miss), and the retrieval recall the ranker works under."""
    ranks = torch.from_numpy(ranker_ranks(model, frame, accelerator, batch_size))
    result = {"all": {**ranking_metrics(ranks), "retrieval_recall": float(torch.isfinite(ranks).double().mean())}}
    for name, mask in (slices or {}).items():
        result[name] = ranking_metrics(ranks[torch.from_numpy(np.array(mask, dtype=bool))])
    return result
