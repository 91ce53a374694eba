"""`distrec evaluate`: what a set of recommendation lists gains and loses.

    distrec evaluate --recs recs/ml1m --data data/ml-1m-sasrec --out reports/ml1m [--run runs/ml1m_id]
    distrec evaluate --sweep --run runs/ml1m_id --data data/ml-1m-sasrec --out reports/ml1m-sweep

Accuracy is full-ranking (the lists come from the whole catalog, seen items excluded):
NDCG / HR / MRR at 5, 10, 20 over every test user (a user without a list is a miss).
Beyond accuracy over the lists at 10: intra-list diversity (item vectors when `--run` is
given, and category Jaccard), category and catalog coverage, Gini of exposure, novelty,
calibration KL, alpha-NDCG. Slices: cold-start targets, users by history length.
Writes metrics.json, report.md, report.html and PNG plots (distrec.report).

What is scored is checked first (distrec.recs): lists made from another dataset, an
unfinished job, a part twice, a corrupt part are refused in one line; an existing report
is replaced only with --overwrite (distrec.outputs). Figures from few users come with
their 95% interval and a warning; a slice without users is n/a (null), not 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from distrec import metrics as M
from distrec import policies as P
from distrec import report
from distrec.atomic import write_atomic
from distrec.catalog import catalog_vectors, primary_categories
from distrec.config import ConfigError
from distrec.outputs import MARKER, check_output, fingerprint_dir, fingerprint_file, mark_output
from distrec.recs import read_recommendations

KS = M.KS  # the cut-offs of every table (distrec.metrics)
LENGTH_BUCKETS = ((0, 5), (6, 20), (21, 10**9))
FEW_USERS = 100  # below this many test users the report warns that its figures are noisy


def list_ranks(recs: pd.DataFrame, test: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """Rank (1-based) of each test user's target in their recommended list; +inf if absent
    (metrics.target_ranks is the rank in a score row over the whole catalog)."""
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
    return np.array(ranks.to_numpy(), dtype=np.float64)  # a writable copy (pandas' own array is read-only)


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
    """The metrics of `recs` (user_id, item_id, rank) on the test users of `data`; with
    "warnings" (a list of lines) for what a reader must know to trust the figures."""
    test, users, items = data["test"], data["users"], data["items"]
    list_length = int(recs["rank"].max())
    ranks = torch.from_numpy(list_ranks(recs, test, users, items))
    ks = tuple(x for x in KS if x <= list_length) or (list_length,)  # beyond the list the ranking is unknown
    result = {"users": len(test), "users_with_lists": int(recs["user_id"].nunique()), "list_length": list_length,
              "accuracy": M.ranking_metrics(ranks, ks, none_if_empty=True), "warnings": []}
    per_user = {"ndcg": M.ndcg, "hr": M.hit_rate, "mrr": M.mrr}
    result["accuracy_interval"] = {f"{m}@{x}": M.interval_half_width(f(ranks, x)) for x in ks for m, f in per_user.items()}
    main = report.main_k(result["accuracy"])
    if len(test) < FEW_USERS:
        value, half = result["accuracy"][f"ndcg@{main}"], result["accuracy_interval"][f"ndcg@{main}"]
        result["warnings"].append(
            f"NDCG@{main} from {len(test)} test users: {report.number(value, len(test))} "
            f"+-{report.number(half) if half is not None else 'n/a'} (95% interval half-width, normal approximation); "
            f"below {FEW_USERS} users the figures are too noisy to compare models")
    cold = np.array(test["cold_target"].to_numpy(), dtype=bool)  # writable copies for torch.from_numpy
    lengths = np.array(test["history"].map(len).to_numpy(), dtype=np.int64)
    slices = {"cold_targets": cold, "warm_targets": ~cold}
    for low, high in LENGTH_BUCKETS:
        slices[f"history_{low}-{high if high < 10**9 else 'max'}"] = (lengths >= low) & (lengths <= high)
    # every slice, an empty one too: its metrics are null ("n/a (0 users)"), not 0
    result["slices"] = {name: M.ranking_metrics(ranks[torch.from_numpy(mask)], ks, none_if_empty=True)
                        for name, mask in slices.items()}
    k = min(k, list_length)
    lists, list_users = list_matrix(recs, test, users, items, k)
    result[f"beyond@{k}"] = beyond_accuracy(lists, list_users, data, vectors)
    result["exposure"] = M.exposure(lists, len(items)).tolist()
    return result


# --- sweep: the accuracy-diversity trade-off of each policy on one run ------------------

def _replace(out: Path, keep_sweep: bool = False) -> None:
    """Remove the files of the earlier evaluate output in `out` (check_output said it may be
    replaced): only the names distrec evaluate writes, never anything else."""
    for name in (*report.REPORT_FILES, *(() if keep_sweep else report.SWEEP_FILES), MARKER):
        (out / name).unlink(missing_ok=True)


def _dataset_sha(data_dir: Path) -> str | None:
    manifest = data_dir / "manifest.json"
    return fingerprint_file(manifest) if manifest.is_file() else None


def sweep(run: Path, data_dir: Path, out: Path, k: int = 10, candidates: int = 100, max_loss: float = 0.02,
          category_level: int = -1, policies: dict | None = None, overwrite: bool = False,
          similarity: str = "model") -> dict:
    """Every policy over a range of strengths on the test users; the best diversity reached
    while NDCG@k stays within `max_loss` (relative) of no re-ranking. `similarity` is what
    alike means both to mmr/dpp and to ILD: the run's item vectors (model), its item tower's
    text embeddings (text) or the category. Writes sweep.json and tradeoff.png into `out`,
    replacing an earlier evaluate output there only with `overwrite`."""
    from distrec.retrieval import Retriever  # the job's first stage, in this process (no Ray)
    from distrec.score.config import PolicyConfig

    run, data_dir, out = Path(run), Path(data_dir), Path(out)
    replacing = check_output(out, "evaluate", inputs=[run, data_dir], flag="--overwrite", overwrite=overwrite)
    data = load_data(data_dir, category_level)
    test, items = data["test"], data["items"]
    table, popularity, similar = catalog_vectors(run, items, similarity, category_level)
    table = torch.from_numpy(np.array(table))
    histories = list(test["history"])
    retriever = Retriever(run, items, table, torch.from_numpy(np.array(popularity)), candidates)
    ild_vectors = table if similar is None else torch.from_numpy(np.array(similar))  # ILD's "alike" is the policies'
    relevance, candidates, _, _ = retriever(histories)  # the same candidates for every policy
    block = P.Candidates(relevance, candidates, k, similar=ild_vectors, categories=data["primary"],
                         num_categories=len(data["category_names"]), histories=histories)
    targets = torch.tensor(test["target"].to_numpy()).unsqueeze(1)
    points = []
    for name, strengths in [("none", [0.0])] + list((policies or P.swept()).items()):
        for strength in strengths:
            policy = PolicyConfig(name=name, strength=strength, similarity=similarity)
            lists = candidates.gather(1, P.rerank(policy, block))
            ranks = torch.full((len(test),), float("inf"), dtype=torch.float64)
            hit = lists == targets
            found = hit.any(dim=1)
            ranks[found] = hit[found].float().argmax(dim=1).double() + 1
            beyond = beyond_accuracy(lists, test["user"].to_numpy(), data, ild_vectors)
            points.append({"policy": name, "strength": strength, f"ndcg@{k}": M.ranking_metrics(ranks, (k,))[f"ndcg@{k}"],
                           **{f"{m}@{k}": beyond[m] for m in ("ild", "ild_category", "category_coverage", "catalog_coverage")}})
    reference = points[0][f"ndcg@{k}"]
    best = {}
    for name in (policies or P.swept()):
        allowed = [p for p in points if p["policy"] == name and p[f"ndcg@{k}"] >= (1 - max_loss) * reference]
        if allowed:
            best[name] = {"ild": max(allowed, key=lambda p: p[f"ild@{k}"]),
                          "category_coverage": max(allowed, key=lambda p: p[f"category_coverage@{k}"])}
    result = {"k": k, "max_loss": max_loss, "reference_ndcg": reference, "points": points, "best_within_loss": best,
              "similarity": similarity,
              "run": str(run.resolve()), "data": str(data_dir.resolve()), "users": len(test)}
    if replacing:
        _replace(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "evaluate", {"run": result["run"], "data": result["data"],
                                  "dataset_manifest_sha256": _dataset_sha(data_dir)})
    write_atomic(out / "sweep.json", json.dumps(result, indent=2))
    report.plot_sweep(result, out)
    return result


def _kept_sweep(out: Path, data_dir: Path, run: Path | None, warnings: list[str]) -> dict | None:
    """The sweep.json a sweep of the same run and data wrote into `out` just before (keep_sweep)."""
    try:
        kept = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return None
    same = kept.get("data") == str(data_dir.resolve()) and (run is None or kept.get("run") == str(run.resolve()))
    if not same:
        warnings.append(f"{out / 'sweep.json'}: a sweep of {kept.get('run')} on {kept.get('data')}, not of this run "
                        "and data: left out of the report")
        return None
    return kept


def retrieval_stage(recs_dir: Path, data: dict, job: str | None) -> dict | None:
    """With a ranker: the retrieval recall@K of the candidates it re-scored (the ceiling it works
    under: a target the retriever missed is a miss whatever the ranker does), overall and on cold
    targets, from the job's candidates-*.parquet. None for a retrieval-only job."""
    import pyarrow.parquet as pq

    paths = sorted(Path(recs_dir).glob("candidates-*.parquet"))
    if not paths:
        return None
    frames = []
    for path in paths:
        record = json.loads(pq.read_metadata(path).metadata.get(b"distrec", b"{}"))
        if job is not None and record.get("job") != job:
            raise ConfigError(f"{path}: candidates of another scoring job than {Path(recs_dir) / 'job.json'}; "
                              "re-run distrec score into an empty --out")
        frames.append(pd.read_parquet(path))
    cands = pd.concat(frames, ignore_index=True)
    depth = int(cands["retrieval_rank"].max())
    ranks = list_ranks(cands.rename(columns={"retrieval_rank": "rank"}), data["test"], data["users"], data["items"])
    cold = np.array(data["test"]["cold_target"].to_numpy(), dtype=bool)
    found = np.isfinite(ranks)
    return {"candidates": depth, f"recall@{depth}": float(found.mean()),
            f"recall@{depth}_cold_targets": float(found[cold].mean()) if cold.any() else None,
            "users": int(len(ranks))}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b (per-user values on the same users) and its 95% percentile interval from
    `samples` bootstrap resamples of the users (paired: one resample draws a user's both values)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 100):  # 100 resamples at a time: (100, users) indices
        idx = rng.integers(0, len(diff), size=(min(100, samples - start), len(diff)))
        means[start:start + len(idx)] = diff[idx].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(diff.mean()), "interval95": [float(low), float(high)], "samples": samples}


def compare_lists(recs: pd.DataFrame, other_dir: Path, data_dir: Path, data: dict, k: int = 10) -> dict:
    """These lists against another recommendations folder on the same test users: NDCG@k and
    HR@k of each, the difference and its paired bootstrap 95% interval, overall and on cold targets."""
    other, _ = read_recommendations(other_dir, data_dir)
    k = min(k, int(other["rank"].max()))  # beyond the shorter list the ranking is unknown
    mine = torch.from_numpy(list_ranks(recs, data["test"], data["users"], data["items"]))
    theirs = torch.from_numpy(list_ranks(other, data["test"], data["users"], data["items"]))
    cold = torch.from_numpy(np.array(data["test"]["cold_target"].to_numpy(), dtype=bool))
    out = {"against": str(Path(other_dir).resolve())}
    for name, f in (("ndcg", M.ndcg), ("hr", M.hit_rate)):
        for label, mask in (("", slice(None)), ("_cold_targets", cold)):
            a, b = f(mine[mask], k).numpy(), f(theirs[mask], k).numpy()
            if len(a) == 0:
                continue
            out[f"{name}@{k}{label}"] = {"this": float(a.mean()), "other": float(b.mean()), **paired_bootstrap(a, b)}
    return out


def evaluate(recs_dir: Path, data_dir: Path, out: Path, run: Path | None = None, category_level: int = -1,
             overwrite: bool = False, keep_sweep: bool = False, similarity: str = "model",
             compare: Path | None = None) -> dict:
    """Metrics and report of the lists in `recs_dir` (a distrec score output) on `data_dir`'s
    test users, written into `out`. Refuses, before writing anything, an `out` holding an
    earlier report without `overwrite`, lists made from another dataset, an unfinished or
    mixed job (distrec.recs). `keep_sweep`: keep (and report) the sweep.json that
    `sweep(run, data_dir, out)` wrote into `out` just before (distrec demo). The result's
    "warnings" are lines for the user (the CLI prints them; metrics.json and the report hold them)."""
    recs_dir, data_dir, out = Path(recs_dir), Path(data_dir), Path(out)
    run = Path(run) if run is not None else None
    replacing = check_output(out, "evaluate", inputs=[recs_dir, data_dir, run, compare], flag="--overwrite",
                             overwrite=None if keep_sweep else overwrite)
    if replacing and keep_sweep and not overwrite and any(
            p.name not in (*report.SWEEP_FILES, MARKER) for p in out.iterdir()):
        raise ConfigError(f"{out}: already holds a distrec evaluate report; pass --overwrite to replace it, "
                          "or choose another output directory")
    data = load_data(data_dir, category_level)
    recs, about = read_recommendations(recs_dir, data_dir)
    warnings = list(about.pop("warnings"))
    vectors = None
    if run is not None:
        scored_with = (_job_inputs(recs_dir).get("checkpoint_sha256"), about.get("run"))
        if scored_with[0] and (run / "best").is_dir() and fingerprint_dir(run / "best") != scored_with[0]:
            warnings.append(f"ILD is measured with the item vectors of {run}, not of the run the lists were scored "
                            f"with ({scored_with[1]}: another checkpoint)")
        table, _, similar = catalog_vectors(run, data["items"], similarity, category_level)
        # ILD's "alike": the run's item vectors, or (similarity=text) its text embeddings
        vectors = torch.tensor(np.array(table if similarity == "model" else similar))
    result = evaluate_lists(recs, data, vectors)
    result["warnings"] = warnings + result["warnings"]
    stage = retrieval_stage(recs_dir, data, about["job"])
    if stage is not None:
        result["retrieval"] = stage
    if compare is not None:
        result["compare"] = compare_lists(recs, Path(compare), data_dir, data, k=min(10, result["list_length"]))
    result["about"] = {"recs": str(recs_dir.resolve()), "job": about["job"], "parts": about["parts"],
                       "policy": about["policy"], "data": str(data_dir.resolve()),
                       "run": str(run.resolve()) if run is not None else None, "scored_with_run": about["run"],
                       "ild_similarity": similarity if run is not None else None,
                       "dataset_manifest_sha256": _dataset_sha(data_dir)}
    sweep_result = _kept_sweep(out, data_dir, run, result["warnings"]) if keep_sweep and replacing else None
    if replacing:
        _replace(out, keep_sweep=sweep_result is not None)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "evaluate", {k: result["about"][k] for k in ("recs", "job", "data", "run",
                                                                  "dataset_manifest_sha256")})
    report.write_report(result, out, f"distrec evaluate: {recs_dir}", sweep_result)
    return result


def _job_inputs(recs_dir: Path) -> dict:
    try:
        return json.loads((recs_dir / "job.json").read_text()).get("inputs") or {}
    except (OSError, ValueError, AttributeError):
        return {}
