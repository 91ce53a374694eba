"""How each cost grows: full-catalog scoring time against catalog size and against users,
and training step time against history length; one PNG per curve in benchmarks/figures/.

    python benchmarks/cost_curves.py [--no-append]

Scoring: distrec's blocked top-100 kernel on random 64-dim vectors. Training: one step
(forward, backward, AdamW) of the ID model (SASRec-like user tower, 2 layers, 64 dims, full
softmax over 3,416 items, batch 128) at each history length. Best of 3 per point.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from distrec.models.config import ModelConfig
from distrec.models.recommender import Recommender
from distrec.score.kernel import top_candidates

from _report import FIGURES, best_of, publish  # noqa: E402 (benchmarks/ is the script directory)


def scoring_vs_items(items_list, users: int = 512, dim: int = 64) -> list[tuple[int, float]]:
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(users, dim, generator=gen)
    out = []
    for items in items_list:
        table = torch.randn(items, dim, generator=gen)
        out.append((items, best_of(lambda: top_candidates(u, table, 100)) / users))
    return out


def scoring_vs_users(users_list, items: int = 100_000, dim: int = 64) -> list[tuple[int, float]]:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(items, dim, generator=gen)
    out = []
    for users in users_list:
        u = torch.randn(users, dim, generator=gen)
        out.append((users, best_of(lambda: [top_candidates(u[i:i + 1024], table, 100) for i in range(0, users, 1024)])))
    return out


def training_vs_length(lengths, batch: int = 128, items: int = 3416) -> list[tuple[int, float]]:
    out = []
    for length in lengths:
        torch.manual_seed(0)
        model = Recommender(ModelConfig(item_repr="id", dim=64, heads=2, layers=2, max_len=length, dropout=0.1), items)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        history = torch.randint(0, items, (batch, length))
        target = torch.randint(0, items, (batch,))

        def step():
            loss = model(history, target)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        out.append((length, best_of(step)))
    return out


def plot(points, xlabel, ylabel, title, path, loglog=True) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    x, y = zip(*points)
    ax.plot(x, y, "o-")
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    by_items = scoring_vs_items([10_000, 30_000, 100_000, 300_000, 1_000_000])
    by_users = scoring_vs_users([1024, 4096, 16384, 65536])
    by_length = training_vs_length([25, 50, 100, 200])
    plot([(i, t * 1e6) for i, t in by_items], "catalog items", "microseconds per user",
         "Top-100 scoring: cost per user vs catalog size", FIGURES / "scoring_vs_items.png")
    plot(by_users, "users", "seconds", "Top-100 scoring of 100k items: time vs users",
         FIGURES / "scoring_vs_users.png", loglog=False)
    plot([(n, t * 1e3) for n, t in by_length], "history length (positions)", "ms per step",
         "Training step (ID model, batch 128) vs history length", FIGURES / "training_vs_length.png", loglog=False)
    rows = ([f"| scoring, per user | {i:,} items | {t * 1e6:,.0f} us |" for i, t in by_items]
            + [f"| scoring 100k items | {u:,} users | {t:.2f} s |" for u, t in by_users]
            + [f"| training step | history {n} | {t * 1e3:,.0f} ms |" for n, t in by_length])
    text = "\n".join([
        f"## How the costs grow ({platform.machine()}, {torch.get_num_threads()} threads)", "",
        f"`python benchmarks/cost_curves.py {' '.join(sys.argv[1:])}`", "",
        "| curve | point | time |", "|---|---|---|", *rows, "",
        "Plots: [scoring vs catalog size](benchmarks/figures/scoring_vs_items.png), "
        "[scoring vs users](benchmarks/figures/scoring_vs_users.png), "
        "[training vs history length](benchmarks/figures/training_vs_length.png), "
        "[DPP/MMR vs N and k](benchmarks/figures/dpp_cost.png).", ""])
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
