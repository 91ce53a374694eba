"""Full-catalog top-N: distrec's blocked kernel vs FAISS IndexFlatIP vs plain torch.topk(U @ I.T),
and the whole Ray scoring job vs its kernel alone. Ratios are measured in the same run.

    python benchmarks/scoring.py --run runs/ml1m_id --data data/ml-1m-sasrec     # real vectors (ML-1M)
    python benchmarks/scoring.py --items 1000000 --dim 64 --users 2000            # synthetic vectors

Achieved FLOP/s (2 * users * items * dim / time) is reported against this machine's
matrix-product peak in the dtype each method's product runs in (fp32, or bf16 for the
kernel's candidate pass), measured here too. Appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from distrec.score import bf16_bound, kernel_cpu
from distrec.score.faiss_topk import FaissTopK
from distrec.score.kernel import top_candidates

from _report import best_of, publish  # noqa: E402 (benchmarks/ is the script directory)
from gemm import peak_flops  # noqa: E402

BATCHES = (256, 1024, 2048, 4096, 8192)  # queries per call, swept for every method
PLAIN_BYTES = 4 * 2**30  # torch.topk(U @ I.T) holds a (batch x items) fp32 matrix: at most this


def sweep_batches(call, users: torch.Tensor, cap: int | None = None) -> dict:
    """{queries per call: users/s} of `call` over BATCHES (and all the users) up to `cap`: a
    warm-up call, then one timed pass over max(2 batches, 2,048) users (FAISS below its best
    batch runs at ~90 users/s: a pass over every user at each batch would take minutes)."""
    import time

    sizes = sorted({b for b in BATCHES if b <= len(users)} | {len(users)})
    rates = {}
    for batch in sizes:
        if cap is not None and batch > cap:
            continue
        count = min(len(users), max(2 * batch, 2048))
        call(users[:batch])
        started = time.perf_counter()
        for i in range(0, count, batch):
            call(users[i:min(i + batch, count)])
        rates[batch] = count / (time.perf_counter() - started)
    return rates



def vectors_from_run(run: Path, data: Path, users: bool = True):
    import pandas as pd

    from distrec.config import load_config
    from distrec.data.shards import left_pad
    from distrec.score.config import ScoreConfig
    from distrec.score.job import catalog_and_popularity
    from distrec.models.run import load_model

    items = pd.read_parquet(data / "items.parquet")
    cfg = load_config(ScoreConfig, None, [], base={"run": str(run), "data": str(data), "out": "unused"})
    table = torch.from_numpy(catalog_and_popularity(cfg, items)[0])
    model = load_model(run / "best", items, run / "tokenizer").eval()
    histories = list(pd.read_parquet(data / "test.parquet")["history"])
    if not users:
        return None, table.float(), model, histories
    with torch.no_grad():
        users = torch.cat([model.user_vectors(left_pad(histories[i:i + 1024], 0), table)
                           for i in range(0, len(histories), 1024)])
    return users.float(), table.float(), model, histories


def tower_and_kernel(model, histories, table, n, batch=1024):
    """The job's per-user work in one process: user vectors from the histories, then the kernel."""
    from distrec.data.shards import left_pad

    with torch.no_grad():
        for i in range(0, len(histories), batch):
            history = left_pad(histories[i:i + batch], 0)
            top_candidates(model.user_vectors(history, table).float(), table, n, history)


def job_vs_one_process(run, data, n, model, histories, table, repeat=2, address=None):
    """Table lines: the Ray job against the same per-user work in one process."""
    from distrec.config import load_config
    from distrec.score.config import ScoreConfig
    from distrec.score.job import score

    in_process = best_of(lambda: tower_and_kernel(model, histories, table, n), repeat=repeat)
    with tempfile.TemporaryDirectory() as tmp:
        summary = score(load_config(ScoreConfig, None, [], base={
            "run": str(run), "data": str(data), "out": f"{tmp}/recs", "candidates": n, "k": 20, "address": address}))
    tower_rate = len(histories) / in_process
    fixed = summary["seconds"] - summary["embed_seconds"] - len(histories) / summary["users_per_s_in_blocks"]
    return "\n".join([
        "", f"The whole `distrec score` Ray job (policy none, {os.cpu_count()} CPUs, {summary['actors']} actors, "
        + ("on a Ray already running, " if address else "starting its own local Ray, ")
        + f"{len(histories):,} users) against the same per-user work in one process (user tower on the histories, "
        "then the kernel):", "",
        "| | users/s | fraction of the one-process work |", "|---|---|---|",
        f"| user tower + kernel, one process, no Ray | {tower_rate:,.0f} | 1.00 |",
        f"| Ray job, inside the actors (Ray and actor start-up excluded) | {summary['users_per_s_in_blocks']:,.0f} | "
        f"{summary['users_per_s_in_blocks'] / tower_rate:.2f} |",
        f"| Ray job, end to end after embedding the catalog ({summary['embed_seconds']} s) | "
        f"{summary['users_per_s']:,.0f} | {summary['users_per_s'] / tower_rate:.2f} |", "",
        f"Fixed cost of the job (Ray, actors, model loading: end-to-end time less the catalog embedding and the "
        f"actors' working time): {fixed:.1f} s.", ""])


def replicated(data: Path, times: int, out: Path) -> Path:
    """A dataset of `times` copies of `data`'s users (same histories, new user ids) over the
    same catalog: the job's per-user work at a nightly run's size, without training a model
    for it. Nothing is cached between users, so a copy costs what a new user would."""
    import numpy as np
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    for name in ("items.parquet", "manifest.json"):
        (out / name).symlink_to((data / name).resolve())
    users = pd.read_parquet(data / "users.parquet")
    test = pd.read_parquet(data / "test.parquet")
    n = len(users)
    pd.DataFrame({"index": np.arange(n * times, dtype=np.int32),
                  "user_id": [f"{u}~{r}" for r in range(times) for u in users["user_id"]]}).to_parquet(out / "users.parquet")
    pd.concat([test.assign(user=test["user"] + r * n) for r in range(times)], ignore_index=True).to_parquet(
        out / "test.parquet")
    return out


def job_only(args) -> int:
    from distrec.score.actor import user_frame

    with tempfile.TemporaryDirectory() as tmp:
        data = replicated(args.data, args.replicate, Path(tmp) / "data") if args.replicate > 1 else args.data
        _, table, model, _ = vectors_from_run(args.run, args.data, users=False)
        histories = list(user_frame(data, "all")["history"])  # what the job scores: the test history, then its target
        what = (f"{args.data.name}'s {len(histories) // args.replicate:,} users x {args.replicate}"
                if args.replicate > 1 else args.data.name)
        text = "\n".join([f"## The Ray scoring job against one process ({what}: {len(histories):,} users x "
                          f"{len(table):,} items x {table.shape[1]} dims, top-{args.n}"
                          + (", Ray already running" if args.address else "") + ")", "",
                          f"`python benchmarks/scoring.py {' '.join(sys.argv[1:])}` ({platform.machine()}, "
                          f"{torch.get_num_threads()} threads)",
                          job_vs_one_process(args.run, data, args.n, model, histories, table, repeat=1,
                                             address=args.address)])
    publish(text, append=not args.no_append)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n", type=int, default=100, help="top-N")
    parser.add_argument("--threads", type=int, default=0, help="threads for every method (0: torch's default)")
    parser.add_argument("--job-only", action="store_true",
                        help="with --run: only the Ray job against the same work in one process (large user counts)")
    parser.add_argument("--replicate", type=int, default=1,
                        help="with --job-only: score each user of --data this many times over (new user ids)")
    parser.add_argument("--address", help="with --job-only: a running Ray to score on (e.g. 127.0.0.1:6379)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.job_only:
        return job_only(args)
    if args.run:
        users, table, model, histories = vectors_from_run(args.run, args.data)
        label = f"{args.data.name}: {len(users):,} users x {len(table):,} items x {table.shape[1]} dims (trained vectors)"
    else:
        gen = torch.Generator().manual_seed(0)
        users, table = torch.randn(args.users, args.dim, generator=gen), torch.randn(args.items, args.dim, generator=gen)
        label = f"synthetic: {args.users:,} users x {args.items:,} items x {args.dim} dims"
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    import faiss

    faiss.omp_set_num_threads(threads)  # every method on the same cores
    flops_per_user = 2 * table.shape[0] * table.shape[1]
    peak = {"fp32": peak_flops(torch.float32), "bf16": peak_flops(torch.bfloat16)}
    uses_bf16 = kernel_cpu.bf16_pays(table)
    faiss_top = FaissTopK(table)
    # each method called with a whole batch of queries per call, the batch swept (FAISS's
    # IndexFlatIP runs ~17x faster from ~2,000 queries per search call than below); plain
    # torch.topk holds a (batch x items) fp32 matrix, so its batch stops at PLAIN_BYTES
    calls = {"kernel auto": lambda u: top_candidates(u, table, args.n, precision="auto"),
             "kernel fp32": lambda u: top_candidates(u, table, args.n, precision="fp32"),
             "plain": lambda u: (u @ table.T).topk(args.n, dim=1),
             "faiss": lambda u: faiss_top(u, args.n)}
    plain_cap = max(1, PLAIN_BYTES // (4 * table.shape[0]))
    methods = [("distrec kernel, bf16 candidates + exact fp32 (default here)", "kernel auto", "bf16")] if uses_bf16 else []
    methods += [("distrec kernel, fp32" + ("" if uses_bf16 else " (default here)"), "kernel fp32", "fp32"),
                ("torch.topk(U @ I.T)", "plain", "fp32"), ("FAISS IndexFlatIP", "faiss", "fp32")]
    swept = {}
    for name, key, _ in methods:
        swept[name] = sweep_batches(calls[key], users, plain_cap if key == "plain" else None)
        rate, batch = max((r, b) for b, r in swept[name].items())
        print(f"{name}: best {rate:,.0f} users/s at {batch} queries per call "
              f"({', '.join(f'{b}: {r:,.0f}' for b, r in swept[name].items())})", flush=True)
    best = {name: max((r, b) for b, r in rates.items()) for name, rates in swept.items()}
    batch = 1024
    exact = torch.cat([(users[i:i + batch] @ table.T).topk(args.n, dim=1).indices for i in range(0, len(users), batch)])
    before = dict(bf16_bound.STATS)
    found = torch.cat([top_candidates(users[i:i + batch], table, args.n)[1] for i in range(0, len(users), batch)])
    again = bf16_bound.STATS["fp32_again"] - before["fp32_again"]
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)) / exact.numel()
    faiss_rate = best["FAISS IndexFlatIP"][0]
    rows = [f"| {name} | {dtype} | {best[name][1]:,} | {best[name][0]:,.0f} | {flops_per_user * best[name][0] / 1e9:.0f} | "
            f"{flops_per_user * best[name][0] / peak[dtype]:.2f} | {flops_per_user * best[name][0] / peak['fp32']:.2f} | "
            f"{best[name][0] / faiss_rate:.2f} |" for name, _, dtype in methods]
    sweeps = "; ".join(f"{name}: " + ", ".join(f"{b:,} -> {r:,.0f}" for b, r in swept[name].items())
                       for name, _, _ in methods)
    settled = (f"; {again} of {len(users):,} users ({again / len(users):.1%}) could not be settled from the bf16 "
               "candidates and were scored again in fp32" if uses_bf16 else "")
    job_line = ""
    if args.run:
        job_line = job_vs_one_process(args.run, args.data, args.n, model, histories, table)
        print(job_line)
    text = "\n".join([
        f"## Full-catalog top-{args.n} scoring ({label})", "",
        f"`python benchmarks/scoring.py {' '.join(sys.argv[1:])}` ({platform.machine()}, {threads} "
        f"threads for every method (torch and FAISS's OpenMP); matrix-product peak measured in this run: fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} "
        f"GFLOP/s; recall of the kernel's top-{args.n} against an fp32 exact search: {recall:.4f}{settled})", "",
        "| method | product dtype | best queries per call (swept) | users/s | GFLOP/s | fraction of its dtype's peak "
        "| of the fp32 peak | x FAISS at its best |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Each method at its own best: queries per call swept ({', '.join(map(str, BATCHES))}, all {len(users):,}; "
        f"plain topk up to {plain_cap:,}: its (batch x items) matrix), users/s per batch: {sweeps}.", job_line])
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
