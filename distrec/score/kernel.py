"""Full-catalog top-N for a batch of users without holding the (users x catalog) matrix: the
one contract (`top_candidates`) the scoring job, the sweep and the benchmarks call.

The catalog is scored in blocks; each block's top-N merges into a running top-N, so
memory is O(users x (block + N)) whatever the catalog size. Items in a user's history
get -inf (PROTOCOL.md: seen items are never recommended). Where the devices divide:
- distrec.score.kernel_cpu: CPUs, a compiled heap scan over fp32 (or bf16 + exact fp32)
  score blocks;
- distrec.score.kernel_torch: GPUs and any other device, torch.topk per block (bf16 on
  tensor cores with the same exactness proof);
- distrec.score.bf16_bound: why the bf16 candidates give the exact fp32 answer, per user;
- distrec.score.faiss_topk: FAISS IndexFlatIP behind the same contract.
No maintained library offers a blocked exact top-N with per-user exclusions on CPU:
FAISS's `IndexFlatIP` cannot skip a user's seen items (BENCHMARKS.md compares them).
"""

from __future__ import annotations

import torch

from distrec.score import kernel_cpu
from distrec.score.bf16_bound import BF16_MIN_SIZE, cannot_overflow, catalog_facts
from distrec.score.kernel_torch import top_candidates_torch, top_candidates_torch_bf16


@torch.no_grad()
def top_candidates(users: torch.Tensor, table: torch.Tensor, n: int, history: torch.Tensor | None = None,
                   block: int | None = None, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, items), each (B, n), best first: the n highest dot products of each user
    (B, d) with the catalog (N, d), history (B, L; -1 = padding) excluded. A user whose
    history leaves fewer than n items gets seen items with score -inf at the end.

    precision: "fp32" scores every item in fp32; "bf16" takes candidates from a bf16
    product and scores them exactly in fp32 (the same top n: distrec.score.bf16_bound);
    "auto" is bf16 on CPUs with bf16 matrix units and on CUDA GPUs with bf16, for catalogs
    where items x dims >= BF16_MIN_SIZE."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    n = min(n, table.shape[0])
    if n <= 0:
        return (torch.empty((len(users), 0), dtype=users.dtype, device=users.device),
                torch.empty((len(users), 0), dtype=torch.long, device=users.device))
    if not bool(torch.isfinite(users).all()):
        raise ValueError("user vectors contain NaN or infinity: the model produced them, check its checkpoint")
    table = table.float() if users.device.type == "cpu" else table
    facts = catalog_facts(table)
    if not facts["finite"]:
        raise ValueError("catalog vectors contain NaN or infinity: the model produced them, check its checkpoint")
    if users.device.type == "cpu" and kernel_cpu.available and users.dtype == torch.float32:
        return kernel_cpu.top_candidates_cpu(users, table, n, history, block or kernel_cpu.CPU_BLOCK, precision, facts)
    if precision == "bf16" or (precision == "auto" and users.device.type == "cuda" and torch.cuda.is_bf16_supported()
                               and table.shape[0] * table.shape[1] >= BF16_MIN_SIZE):
        if cannot_overflow(users, facts):
            return top_candidates_torch_bf16(users, table, n, history, block or 65536, facts)
    return top_candidates_torch(users, table, n, history, block or 65536)
