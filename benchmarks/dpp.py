"""Batched DPP greedy MAP (distrec.diversity.dpp) vs a faithful per-user NumPy implementation
of Chen, Zhang, Zhou (NeurIPS 2018) Algorithm 1, and MMR likewise; picks checked identical.

    python benchmarks/dpp.py [--users 2000] [--candidates 200] [--k 10]

Prints users/s of both and the ratio measured in the same run; appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import numpy as np
import torch

from distrec import diversity

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)



def dpp_numpy(kernel: np.ndarray, k: int, eps: float = 1e-10) -> list[int]:
    """Chen et al. 2018, Algorithm 1, for one user (their reference code's structure)."""
    n = kernel.shape[0]
    cis = np.zeros((k, n))
    di2s = np.copy(np.diag(kernel))
    selected = [int(np.argmax(di2s))]
    while len(selected) < k:
        j = selected[-1]
        t = len(selected) - 1
        ci_optimal = cis[:t, j]
        di_optimal = math.sqrt(di2s[j])
        eis = (kernel[j, :] - ci_optimal @ cis[:t, :]) / di_optimal
        cis[t, :] = eis
        di2s -= np.square(eis)
        di2s[selected] = -np.inf
        nxt = int(np.argmax(di2s))
        if di2s[nxt] < eps:
            break
        selected.append(nxt)
    return selected


def mmr_numpy(rel: np.ndarray, unit: np.ndarray, k: int, lam: float) -> list[int]:
    sim = unit @ unit.T
    picked, max_sim = [], np.zeros(len(rel))
    for step in range(k):
        value = (1 - lam) * rel - lam * (max_sim if step else 0.0)
        value[picked] = -np.inf
        j = int(np.argmax(value))
        picked.append(j)
        max_sim = np.maximum(max_sim, sim[j]) if step else sim[j].copy()
    return picked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    relevance = torch.randn(args.users, args.candidates, generator=gen)
    vectors = torch.randn(args.users, args.candidates, args.dim, generator=gen)
    rows = []
    for name, tradeoff in (("dpp", 0.7), ("mmr", 0.3)):
        # the per-user reference gets the same inputs, prepared outside its timing
        rel = ((relevance - relevance.min(1, keepdim=True).values)
               / (relevance.max(1, keepdim=True).values - relevance.min(1, keepdim=True).values)).double().numpy()
        unit = (vectors / vectors.norm(dim=-1, keepdim=True)).double().numpy()
        if name == "dpp":
            diversity.dpp(relevance[:8], vectors[:8], args.k, tradeoff)  # warm-up
            started = time.perf_counter()
            q = np.exp(tradeoff / (2 * (1 - tradeoff)) * rel)
            # each user's kernel L = diag(q) S diag(q) is built per user, as a per-user pipeline would
            reference = [dpp_numpy(q[b][:, None] * (unit[b] @ unit[b].T) * q[b][None, :], args.k)
                         for b in range(args.users)]
            ref_seconds = time.perf_counter() - started
            started = time.perf_counter()
            picks = diversity.dpp(relevance, vectors, args.k, tradeoff)
        else:
            diversity.mmr(relevance[:8], vectors[:8], args.k, tradeoff)  # warm-up
            started = time.perf_counter()
            reference = [mmr_numpy(rel[b], unit[b], args.k, tradeoff) for b in range(args.users)]
            ref_seconds = time.perf_counter() - started
            started = time.perf_counter()
            picks = diversity.mmr(relevance, vectors, args.k, tradeoff)
        seconds = time.perf_counter() - started
        same = sum(picks[b].tolist() == reference[b] for b in range(args.users))
        rows.append(f"| {name} | {args.users} x {args.candidates} -> {args.k} | {args.users / ref_seconds:,.0f} | "
                    f"{args.users / seconds:,.0f} | {ref_seconds / seconds:.1f}x | {same}/{args.users} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"## Diversity re-ranking: batched torch vs per-user NumPy ({platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "",
        "`python benchmarks/dpp.py " + " ".join(sys.argv[1:]) + "`", "",
        "| policy | users x candidates -> k | NumPy per user (users/s) | batched (users/s) | speed-up | identical picks |",
        "|---|---|---|---|---|---|", *rows, ""])
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
