"""`distrec evaluate`: what a set of recommendation lists gains and loses.

    distrec evaluate --recs recs/ml1m --data data/ml-1m-sasrec --out reports/ml1m [--run runs/ml1m_id]
    distrec evaluate --sweep --run runs/ml1m_id --data data/ml-1m-sasrec --out reports/ml1m-sweep

Accuracy is full-ranking (the lists come from the whole catalog, seen items excluded):
NDCG / HR / MRR at 5, 10, 20 over every test user (a user without a list is a miss).
Beyond accuracy over the lists at 10: intra-list diversity (item vectors when `--run` is
given, and category Jaccard), category and catalog coverage, Gini of exposure, novelty,
calibration KL, alpha-NDCG. Slices: cold-start targets, users by history length.
Writes metrics.json, report.md, report.html and PNG plots.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from distrec import metrics as M
from distrec.atomic import savefig_atomic, write_atomic
from distrec.config import ConfigError

KS = (5, 10, 20)
LENGTH_BUCKETS = ((0, 5), (6, 20), (21, 10**9))


def target_ranks(recs: pd.DataFrame, test: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """Rank (1-based) of each test user's target in their list; +inf if absent."""
    item_index = pd.Series(items["index"].to_numpy(), index=items["item_id"])
    user_index = pd.Series(users["index"].to_numpy(), index=users["user_id"])
    r = pd.DataFrame({"user": user_index.reindex(recs["user_id"]).to_numpy(),
                      "item": item_index.reindex(recs["item_id"]).to_numpy(), "rank": recs["rank"].to_numpy()})
    if r[["user", "item"]].isna().any().any():
        raise ConfigError("the recommendations name users or items that the data directory does not know; "
                          "evaluate with the dataset the lists were scored on")
    hits = r.merge(test[["user", "target"]], left_on=["user", "item"], right_on=["user", "target"])
    ranks = pd.Series(np.inf, index=test["user"].to_numpy())
    ranks[hits["user"].to_numpy()] = hits["rank"].to_numpy()
    return ranks.to_numpy()


def list_matrix(recs: pd.DataFrame, test: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, k: int) -> torch.Tensor:
    """(U, k) item indices of the test users' lists, in rank order."""
    item_index = dict(zip(items["item_id"], items["index"]))
    user_index = dict(zip(users["user_id"], users["index"]))
    top = recs[recs["rank"] <= k].sort_values(["user_id", "rank"])
    per_user = {user_index[u]: [item_index[i] for i in group["item_id"]] for u, group in top.groupby("user_id")}
    present = [u for u in test["user"] if u in per_user and len(per_user[u]) == k]
    return torch.tensor([per_user[u] for u in present], dtype=torch.long), np.array(present)


def beyond_accuracy(lists: torch.Tensor, list_users: np.ndarray, data: dict, vectors: torch.Tensor | None) -> dict:
    items, test = data["items"], data["test"]
    primary, names = data["primary"], data["category_names"]
    history = dict(zip(test["user"], test["history"]))
    from distrec.diversity import category_profile

    profiles = category_profile([history[u] for u in list_users], primary, len(names))
    multi_hot = data["multi_hot"]
    counts = M.exposure(lists, len(items))
    out = {
        "ild_category": M.category_ild(lists, multi_hot),
        "category_coverage": M.category_coverage(lists, primary, len(names)),
        "catalog_coverage": M.catalog_coverage(lists, len(items)),
        "gini": M.gini(counts),
        "novelty": M.novelty(lists, torch.tensor(items["train_count"].to_numpy())),
        "calibration_kl": M.calibration_kl(lists, primary, profiles),
        "alpha_ndcg": M.alpha_ndcg(lists, primary, profiles),
    }
    if vectors is not None:
        out["ild"] = M.intra_list_diversity(lists, vectors)
    return out


def load_data(data_dir: Path, category_level: int = -1) -> dict:
    from distrec.score.job import primary_categories

    if not (data_dir / "test.parquet").is_file():
        raise ConfigError(f"{data_dir}: not a prepared dataset (no test.parquet)")
    items = pd.read_parquet(data_dir / "items.parquet")
    primary, names = primary_categories(items, category_level)
    all_categories: dict[str, int] = {}
    for cats in items["categories"]:
        for c in cats:
            all_categories.setdefault(c, len(all_categories))
    multi_hot = torch.zeros(len(items), len(all_categories), dtype=torch.float64)  # (I, C) every category
    for row, cats in enumerate(items["categories"]):
        for c in cats:
            multi_hot[row, all_categories[c]] = 1.0
    return {"items": items, "users": pd.read_parquet(data_dir / "users.parquet"), "multi_hot": multi_hot,
            "test": pd.read_parquet(data_dir / "test.parquet"), "primary": primary, "category_names": names,
            "all_categories": all_categories}


def evaluate_lists(recs: pd.DataFrame, data: dict, vectors: torch.Tensor | None = None, k: int = 10) -> dict:
    test, users, items = data["test"], data["users"], data["items"]
    list_length = int(recs["rank"].max())
    ranks = torch.from_numpy(target_ranks(recs, test, users, items))
    ks = tuple(x for x in KS if x <= list_length) or (list_length,)  # beyond the list the ranking is unknown
    result = {"users": len(test), "users_with_lists": int(recs["user_id"].nunique()), "list_length": list_length,
              "accuracy": M.ranking_metrics(ranks, ks)}
    cold = test["cold_target"].to_numpy()
    lengths = test["history"].map(len).to_numpy()
    slices = {"cold_targets": cold, "warm_targets": ~cold}
    for low, high in LENGTH_BUCKETS:
        slices[f"history_{low}-{high if high < 10**9 else 'max'}"] = (lengths >= low) & (lengths <= high)
    result["slices"] = {name: M.ranking_metrics(ranks[torch.from_numpy(mask)], ks)
                        for name, mask in slices.items() if mask.any()}
    k = min(k, list_length)
    lists, list_users = list_matrix(recs, test, users, items, k)
    result[f"beyond@{k}"] = beyond_accuracy(lists, list_users, data, vectors)
    result["exposure"] = M.exposure(lists, len(items)).tolist()
    return result


# --- sweep: the accuracy-diversity trade-off of each policy on one run ------------------

SWEEP = {
    "mmr": [0.0, 0.1, 0.2, 0.3, 0.5, 0.7],
    "dpp": [0.99, 0.95, 0.9, 0.8, 0.6, 0.4],
    "category_cap": [10, 5, 3, 2, 1],
    "calibration": [0.0, 0.2, 0.5, 0.8, 0.95],
}


def sweep(run: Path, data_dir: Path, out: Path, k: int = 10, candidates: int = 100, max_loss: float = 0.02,
          category_level: int = -1, policies: dict | None = None) -> dict:
    """Every policy over a range of strengths on the test users; the best diversity reached
    while NDCG@k stays within `max_loss` (relative) of no re-ranking."""
    from distrec.config import load_config, to_dict
    from distrec.score.config import PolicyConfig, ScoreConfig
    from distrec.score.job import BlockScorer, catalog_and_popularity

    data = load_data(data_dir, category_level)
    test, items = data["test"], data["items"]
    base_cfg = load_config(ScoreConfig, None, [], base={"run": str(run), "data": str(data_dir), "out": str(out),
                                                          "k": k, "candidates": candidates,
                                                          "category_level": category_level})
    table, popularity = catalog_and_popularity(base_cfg, items)
    histories = list(test["history"])
    scorer = BlockScorer(to_dict(base_cfg), table, popularity)
    relevance, candidates, _ = scorer.candidates(histories)  # the same candidates for every policy
    targets = torch.tensor(test["target"].to_numpy()).unsqueeze(1)
    points = []
    for name, strengths in [("none", [0.0])] + list((policies or SWEEP).items()):
        for strength in strengths:
            scorer.cfg.policy = PolicyConfig(name=name, strength=strength)
            lists = candidates.gather(1, scorer.rerank(relevance, candidates, histories))
            ranks = torch.full((len(test),), float("inf"), dtype=torch.float64)
            hit = lists == targets
            found = hit.any(dim=1)
            ranks[found] = hit[found].float().argmax(dim=1).double() + 1
            beyond = beyond_accuracy(lists, test["user"].to_numpy(), data, scorer.table)
            points.append({"policy": name, "strength": strength, f"ndcg@{k}": M.ranking_metrics(ranks, (k,))[f"ndcg@{k}"],
                           **{f"{m}@{k}": beyond[m] for m in ("ild", "ild_category", "category_coverage", "catalog_coverage")}})
    reference = points[0][f"ndcg@{k}"]
    best = {}
    for name in (policies or SWEEP):
        allowed = [p for p in points if p["policy"] == name and p[f"ndcg@{k}"] >= (1 - max_loss) * reference]
        if allowed:
            best[name] = {"ild": max(allowed, key=lambda p: p[f"ild@{k}"]),
                          "category_coverage": max(allowed, key=lambda p: p[f"category_coverage@{k}"])}
    result = {"k": k, "max_loss": max_loss, "reference_ndcg": reference, "points": points, "best_within_loss": best}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps(result, indent=2))
    _plot_sweep(result, out)
    return result


def _plot_sweep(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, label in ((axes[0], f"ild@{k}", f"ILD@{k} (1 - mean cosine)"),
                                (axes[1], f"category_coverage@{k}", f"category coverage@{k}")):
        for name in sorted({p["policy"] for p in result["points"]} - {"none"}):
            pts = [p for p in result["points"] if p["policy"] == name]
            axis.plot([p[metric] for p in pts], [p[f"ndcg@{k}"] for p in pts], "o-", label=name)
            best = result["best_within_loss"].get(name, {}).get("ild" if "ild" in metric else "category_coverage")
            if best:
                axis.plot(best[metric], best[f"ndcg@{k}"], "*", markersize=14, color="black")
        none = result["points"][0]
        axis.plot(none[metric], none[f"ndcg@{k}"], "s", color="gray", label="none")
        axis.axhline((1 - result["max_loss"]) * result["reference_ndcg"], ls="--", color="gray", lw=0.8)
        axis.set_xlabel(label)
        axis.set_ylabel(f"NDCG@{k}")
        axis.legend(fontsize=8)
    axes[0].set_title(f"trade-off (stars: most diverse within {result['max_loss']:.0%} NDCG loss)", fontsize=9)
    fig.tight_layout()
    savefig_atomic(fig, out / "tradeoff.png", dpi=110)
    plt.close(fig)


# --- report -----------------------------------------------------------------------------

def _plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    exposure = np.sort(np.asarray(result["exposure"], dtype=float))
    if exposure.sum() > 0:
        fig, axis = plt.subplots(figsize=(5, 4))
        share = np.concatenate([[0], np.cumsum(exposure) / exposure.sum()])
        axis.plot(np.linspace(0, 1, len(share)), share, label="lists")
        axis.plot([0, 1], [0, 1], "--", color="gray", label="equal exposure")
        axis.set_xlabel("share of catalog (least shown first)")
        axis.set_ylabel("share of exposure")
        key = next(k for k in result if k.startswith("beyond@"))
        axis.set_title(f"exposure Lorenz curve, Gini {result[key]['gini']:.3f}")
        axis.legend()
        fig.tight_layout()
        savefig_atomic(fig, out / "exposure.png", dpi=110)
        plt.close(fig)
        names.append("exposure.png")
    slices = result["slices"]
    fig, axis = plt.subplots(figsize=(7, 4))
    labels = list(slices)
    axis.bar(range(len(labels)), [slices[s].get("ndcg@10", 0.0) for s in labels])
    axis.set_xticks(range(len(labels)), [f"{s}\n({slices[s]['users']})" for s in labels], fontsize=7)
    axis.set_ylabel("NDCG@10")
    axis.set_title("accuracy by slice (users)")
    fig.tight_layout()
    savefig_atomic(fig, out / "slices.png", dpi=110)
    plt.close(fig)
    return names + ["slices.png"]


def _sweep_section(out: Path) -> list[str]:
    """The trade-off table and plot, when a sweep was written into the same directory."""
    if not (out / "sweep.json").is_file():
        return []
    sweep_result = json.loads((out / "sweep.json").read_text())
    k, loss = sweep_result["k"], sweep_result["max_loss"]
    lines = ["## Accuracy-diversity trade-off", "",
             f"NDCG@{k} without re-ranking: {sweep_result['reference_ndcg']:.4f}. Most diverse setting of each "
             f"policy while NDCG@{k} stays within {loss:.0%}:", "",
             f"| policy | strength (ILD) | NDCG@{k} | ILD@{k} | strength (coverage) | category coverage@{k} |",
             "|---|---|---|---|---|---|"]
    for name, best in sweep_result["best_within_loss"].items():
        a, b = best["ild"], best["category_coverage"]
        lines.append(f"| {name} | {a['strength']} | {a[f'ndcg@{k}']:.4f} | {a[f'ild@{k}']:.3f} | {b['strength']} | "
                     f"{b[f'category_coverage@{k}']:.3f} |")
    return lines + ["", "![tradeoff.png](tradeoff.png)", ""]


def write_report(result: dict, out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json", json.dumps({k: v for k, v in result.items() if k != "exposure"}, indent=2))
    images = _plots(result, out)
    key = next(k for k in result if k.startswith("beyond@"))
    acc = result["accuracy"]
    lines = [f"# {title}", "", f"{result['users']:,} test users, {result['users_with_lists']:,} with a list of "
             f"{result['list_length']} items.", "", "## Accuracy (full ranking)", "",
             "| metric | value |", "|---|---|", *[f"| {m} | {v:.4f} |" for m, v in acc.items() if m != "users"], "",
             f"## Beyond accuracy ({key.split('@')[1]} items)", "", "| metric | value |", "|---|---|",
             *[f"| {m} | {v:.4f} |" for m, v in result[key].items()], "", "## Slices", "",
             "| slice | users | NDCG@10 | HR@10 |", "|---|---|---|---|",
             *[f"| {s} | {m['users']} | {m.get('ndcg@10', 0):.4f} | {m.get('hr@10', 0):.4f} |"
               for s, m in result["slices"].items()], "", *[f"![{i}]({i})" for i in images], "",
             *_sweep_section(out)]
    markdown = "\n".join(lines)
    write_atomic(out / "report.md", markdown)
    body = "".join(f"<pre>{html.escape(line)}</pre>" if line.startswith("|") else
                   (f"<img src='{line[line.index('(') + 1:-1]}'>" if line.startswith("![") else
                    f"<h2>{html.escape(line[3:])}</h2>" if line.startswith("## ") else
                    f"<h1>{html.escape(line[2:])}</h1>" if line.startswith("# ") else f"<p>{html.escape(line)}</p>")
                   for line in lines if line)
    write_atomic(out / "report.html", f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>{body}")


def evaluate(recs_dir: Path, data_dir: Path, out: Path, run: Path | None = None, category_level: int = -1) -> dict:
    from distrec.score.job import read_recommendations

    data = load_data(data_dir, category_level)
    recs = read_recommendations(recs_dir)
    vectors = None
    if run is not None:
        from distrec.config import load_config
        from distrec.score.config import ScoreConfig
        from distrec.score.job import catalog_and_popularity

        cfg = load_config(ScoreConfig, None, [], base={"run": str(run), "data": str(data_dir), "out": str(out)})
        vectors = torch.from_numpy(catalog_and_popularity(cfg, data["items"])[0])
    result = evaluate_lists(recs, data, vectors)
    write_report(result, out, f"distrec evaluate: {recs_dir}")
    return result

