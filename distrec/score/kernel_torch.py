"""Full-catalog top-N in torch ops, for GPUs and any device without the compiled CPU kernel:
`torch.topk` per block of the catalog merged into a running top-N (on a GPU the selection
runs in parallel with the product and is cheap), and the bf16-candidates scheme of
distrec.score.bf16_bound on tensor cores. Called through distrec.score.kernel.top_candidates."""

from __future__ import annotations

import torch

from distrec.score import bf16_bound
from distrec.score.bf16_bound import BF16_SPARE, NEG, STATS


def mask_history(scores: torch.Tensor, history: torch.Tensor, start: int) -> None:
    """In place: -inf for history items (B, L; -1 = padding) that fall in [start, start + width)."""
    width = scores.shape[1]
    inside = (history >= start) & (history < start + width)
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(history)
    scores[rows[inside], history[inside] - start] = NEG


def top_candidates_torch(users, table, n, history, block):
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


def top_candidates_torch_bf16(users, table, n, history, block, facts):
    """The bf16 scheme of kernel_cpu.top_candidates_bf16 in torch ops, for GPUs: candidates from a bf16
    product (tensor cores; cuBLAS's reduced-precision bf16 reductions turned off for it, so
    that it accumulates in fp32 as the bound assumes), rescored in fp32 by elementwise
    products (TF32 settings do not apply), accepted per user by the same bound; the rest
    are scored again in fp32. Best first, ties to the lower item, like the CPU kernel
    (users scored again follow torch.topk's order among exact ties). Tensor cores that
    truncate instead of round in their fp32 accumulation add at most another d 2^-24 per
    unit of |u| max|v|, inside the bound's 1.05 margin for d up to ~6,000."""
    if facts["bf16"] is None:
        facts["bf16"] = table.bfloat16().contiguous()
    size = min(table.shape[0], 2 * n + BF16_SPARE)
    users = users.float()
    cuda = torch.backends.cuda.matmul
    reduced = cuda.allow_bf16_reduced_precision_reduction
    cuda.allow_bf16_reduced_precision_reduction = False
    try:
        rough, items = top_candidates_torch(users.bfloat16(), facts["bf16"], size, history, block)
    finally:
        cuda.allow_bf16_reduced_precision_reduction = reduced
    exact = (users.unsqueeze(1) * table.float()[items]).sum(dim=2).masked_fill(rough == NEG, NEG)  # seen stay -inf
    by_item = items.argsort(dim=1)  # then a stable sort by score: equal scores keep the lower item first
    items, exact = items.gather(1, by_item), exact.gather(1, by_item)
    order = torch.sort(exact, dim=1, descending=True, stable=True).indices
    items, exact = items.gather(1, order)[:, :n], exact.gather(1, order)[:, :n]
    worst = rough.double().min(dim=1).values
    bound = bf16_bound.bound(users, table.shape[1], facts["max_norm"]).to(users.device)
    complete = ((worst == NEG) | (worst + 2.0**-8 * 1.01 * worst.abs() + bound < exact[:, -1].double())
                if size < table.shape[0] else torch.ones(len(users), dtype=torch.bool, device=users.device))
    redo = (~complete).nonzero().squeeze(1)
    STATS["bf16_users"] += len(users)
    STATS["fp32_again"] += len(redo)
    if len(redo):
        exact[redo], items[redo] = top_candidates_torch(users[redo], table.float(), n,
                                                         None if history is None else history[redo], block)
    return exact, items

