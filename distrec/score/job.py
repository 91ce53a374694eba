"""`distrec score`: every user's top-K over the whole catalog, re-ranked for diversity, as a
Ray Data job (a local Ray by default, a cluster with `address=`).

    distrec score --run runs/ml1m_id --data data/ml-1m-sasrec --out recs/ml1m policy.name=mmr policy.strength=0.3

The catalog is embedded once on the driver and shared with the scoring actors as one
object reference. Users go in blocks; each actor loads the model once, scores a block
against the catalog (blocked matrix product, running top-N, history excluded), applies
the policy and writes the block's Parquet part atomically (temp file, rename). A whole
part is the block's completion marker, so a killed job re-run skips finished blocks and
ends with every user exactly once.

What a job is: its config and what its parts are computed from, by content (the files of
RUN/best, the dataset's manifest and the files the job reads), recorded in job.json under
"inputs". A re-run resumes only the same job; a part counts as done only when its footer
reads and records this job, its block, the block's users and its row count. Anything else
in --out is refused, or with --overwrite replaced (distrec's own files only).

This module is the driver (checks, the catalog, Ray, the summary); the actor that scores and
writes the parts is distrec.score.actor, the output folder's identity and parts
distrec.score.output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from distrec.atomic import write_atomic
from distrec import catalog, policies
from distrec.config import ConfigError, to_dict
from distrec.console import verbose  # DISTREC_VERBOSE=1 (--verbose): Ray's own logs, actor output and bars
from distrec.formats import DataError
from distrec.models.run import read_model_json
from distrec.score.actor import FAULT_ENV, BlockScorer, user_count
from distrec.score.config import ScoreConfig
from distrec.score.output import exposure_counts, open_out, whole_parts

BLOCKS_PER_TASK = 8


def _raise_actor_error(error: str) -> None:
    """Re-raise in the driver an error an actor returned (see BlockScorer.__call__)."""
    e = json.loads(error)
    if e["errno"] is not None:  # the parts already written are whole; a re-run resumes
        raise OSError(e["errno"], e["strerror"], e["filename"])
    raise (DataError if e["type"] == "DataError" else ConfigError)(e["message"])


def _check(cfg: ScoreConfig) -> tuple[pd.DataFrame, Path]:
    if not (cfg.run and cfg.data and cfg.out):
        raise ConfigError("--run, --data and --out are required")
    if cfg.device == "cuda" and not cfg.address and not torch.cuda.is_available():
        raise ConfigError("device=cuda: this machine has no CUDA GPU for the local Ray; use device=auto or cpu")
    meta = read_model_json(Path(cfg.run) / "best")
    data = Path(cfg.data)
    if not (data / "items.parquet").is_file():
        raise ConfigError(f"{data}: not a prepared dataset (no items.parquet)")
    # the actors read the users' histories; a missing file or column fails here, in one line
    needed = {"users.parquet": ["index", "user_id"],
              **({f"{cfg.users}.parquet": ["user", "history"]} if cfg.users in ("test", "val")
                 else {"test.parquet": ["user", "history", "target"]})}
    for name, columns in needed.items():
        if not (data / name).is_file():
            raise ConfigError(f"{data}: not a prepared dataset (no {name})")
        missing = set(columns) - set(pq.read_schema(data / name).names)
        if missing:
            raise ConfigError(f"{data / name}: missing column(s) {sorted(missing)}; prepare the dataset again")
    items = pd.read_parquet(data / "items.parquet")
    if meta["model"]["item_repr"] in ("id", "popularity") and list(items["item_id"]) != meta["item_ids"]:
        raise ConfigError(f"{data}: its items do not match the vocabulary of run {cfg.run} "
                          f"({len(items)} items vs {len(meta['item_ids'])}); score with the dataset the run was trained on")
    if meta["model"].get("kind", "two_tower") != "two_tower":
        raise ConfigError(f"--run {cfg.run}: is a {meta['model']['kind']} run; --run is the retrieval (two-tower) run, "
                          "the ranker goes in ranker.run")
    if cfg.ranker.run:
        check_ranker(cfg, meta, items)
    return items, Path(cfg.out)


def check_ranker(cfg: ScoreConfig, retrieval: dict, items: pd.DataFrame) -> None:
    """A ranker run that cannot re-rank this job's candidates is refused before any work: not a
    ranker, another catalog than the dataset's or the retrieval run's, or trained on the
    candidates of a retrieval run with another backbone or item representation."""
    ranker_dir = Path(cfg.ranker.run)
    meta = read_model_json(ranker_dir / "best")
    if meta["model"].get("kind") != "ranker":
        raise ConfigError(f"ranker.run={ranker_dir}: is not a ranker run (model.kind="
                          f"{meta['model'].get('kind', 'two_tower')}); train one with model.kind=ranker")
    if meta["item_ids"] != list(items["item_id"]) or meta["item_ids"] != retrieval["item_ids"]:
        raise ConfigError(f"ranker.run={ranker_dir} ({meta['num_items']:,} items) and --run {cfg.run} "
                          f"({retrieval['num_items']:,}) / --data {cfg.data} ({len(items):,}) are not on the same "
                          "catalog; train the ranker on this dataset's retrieval candidates")
    try:
        made_from = json.loads((ranker_dir / "results.json").read_text())["ranker"]["retrieval_run"]
    except (OSError, ValueError, KeyError, TypeError):
        made_from = None  # a ranker still training: nothing recorded yet to compare
    if made_from is not None:
        for key in ("backbone", "item_repr"):
            if made_from.get(key) != retrieval["model"].get(key):
                raise ConfigError(f"ranker.run={ranker_dir} was trained on the candidates of a retrieval run with "
                                  f"model.{key}={made_from.get(key)} ({made_from.get('dir')}), --run {cfg.run} has "
                                  f"model.{key}={retrieval['model'].get(key)}; re-rank the candidates of the retriever "
                                  "it was trained with, or train it on this one's (distrec ranker-data)")


def catalog_and_popularity(cfg: ScoreConfig, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The catalog's item vectors, embedded once (batched through the item tower), on the
    driver's GPU when it has one and `device` allows: a text catalog is most of the work."""
    table, popularity, _ = catalog_vectors(cfg, items)
    return table, popularity


def catalog_vectors(cfg: ScoreConfig, items: pd.DataFrame, similarity: str | None = None):
    """distrec.catalog.catalog_vectors of this job's run (similarity: default policy.similarity)."""
    return catalog.catalog_vectors(cfg.run, items, similarity or cfg.policy.similarity, cfg.category_level, cfg.device)


def actor_layout(node_cpus: list[int], blocks: int, asked: int, one: bool) -> tuple[int, int]:
    """(actors, threads per actor) for nodes with these CPU counts. By default one actor per
    node using all its CPUs as threads: on one 2-CPU machine that ran at 1.7x the users/s of two
    1-thread actors at 100,000 items, and started faster (BENCHMARKS.md). `asked` actors share
    the cluster's CPUs; `one`: a single actor (the exposure policy counts across all users)."""
    biggest = max(node_cpus)
    if one:
        return 1, biggest
    if asked:
        actors = min(asked, blocks)
        return actors, max(1, min(biggest, sum(node_cpus) // actors))
    return min(len(node_cpus), blocks), min(node_cpus)


def gpu_layout(node_cpus: list[int], node_gpus: list[int], blocks: int, asked: int, one: bool) -> tuple[int, int]:
    """(actors, CPU threads per actor) with one GPU per actor: by default one actor per GPU in
    the cluster; the threads are the CPUs of the GPU nodes shared by their GPUs."""
    gpus = sum(node_gpus)
    threads = max(1, min(c // g for c, g in zip(node_cpus, node_gpus) if g))
    actors = 1 if one else min(asked or gpus, gpus, blocks)
    return actors, threads


@contextlib.contextmanager
def _ray_output(loud: bool):
    """Unless `loud`, keep Ray's INFO lines and Ray Data's progress logging off the terminal
    (they stay in Ray's session logs): one bar of our own instead (score); and Ray Data's
    no-progress timeout off. Restored after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_no_progress_timeout_s
    # Ray Data fails a dataset that yields no output for 30 min; a task here is several blocks
    # and yields when all are written, which a ranker on a loaded CPU took longer than that
    # for (the parts on disk are the job's progress, and a re-run resumes from them)
    ctx.execution_no_progress_timeout_s = -1
    levels = []
    if not loud:
        ctx.enable_progress_bars = ctx.print_on_execution_start = False
        for name in ("ray", "ray.data"):  # ray.data has its own console handler (and does not propagate)
            for handler in logging.getLogger(name).handlers:
                if not isinstance(handler, logging.FileHandler):
                    levels.append((handler, handler.level))
                    handler.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_no_progress_timeout_s = saved
        for handler, level in levels:
            handler.setLevel(level)


def _init_ray(cfg: ScoreConfig, loud: bool) -> None:
    import ray

    if not ray.is_initialized():
        if not cfg.address:
            # a local Ray starts its workers at nice 15: the scoring actors, which are the job,
            # then got ~5% of a core beside any other process (a training run on the same
            # machine) and a two-stage block took 16 min instead of ~1; on a cluster (address=)
            # the niceness is the cluster's to set
            os.environ.setdefault("RAY_worker_niceness", "0")
        # no address: a fresh local Ray, never a cluster `ray start` left running on this machine
        ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=loud,
                 logging_level=logging.INFO if loud else logging.ERROR,
                 **({} if cfg.address else {"num_cpus": os.cpu_count()}))


def _run_blocks(cfg: ScoreConfig, job: str, todo: list[int], table: np.ndarray, popularity: np.ndarray,
                loud: bool, similar: np.ndarray | None = None) -> tuple[list[dict], int]:
    """Score the blocks `todo` on Ray; (one result row per block, actors)."""
    import ray
    from tqdm.auto import tqdm

    _init_ray(cfg, loud)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]
    node_cpus, node_gpus = [int(n.get("CPU", 0)) for n in nodes], [int(n.get("GPU", 0)) for n in nodes]
    if cfg.device == "cuda" and not any(node_gpus):
        raise ConfigError("device=cuda: the Ray cluster has no GPUs; use device=auto or cpu")
    on_gpus = cfg.device != "cpu" and any(node_gpus)
    # exposure counts every list of the job against one cap: one actor holds the counts
    one = "job" in policies.POLICIES[cfg.policy.name].needs  # job-wide state: one actor
    actors, threads = (gpu_layout(node_cpus, node_gpus, len(todo), cfg.actors, one) if on_gpus
                       else actor_layout(node_cpus or [1], len(todo), cfg.actors, one))
    import ray.data

    env = {"DISTREC_SCORE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    # several blocks per Ray Data task: each task cost ~10 ms of the actor's time around the
    # call (6% at 100,000 items); four tasks per actor at least keep the actors balanced
    group = max(1, min(BLOCKS_PER_TASK, len(todo) // (4 * actors)))
    tasks = math.ceil(len(todo) / group)
    dataset = ray.data.from_items([{"block": b} for b in todo], override_num_blocks=tasks)
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray deprecates the remote-args catch-all
        warnings.simplefilter("ignore", DeprecationWarning)
        done = dataset.map_batches(
            BlockScorer, fn_constructor_args=(to_dict(cfg), ray.put(table), ray.put(popularity),
                                              "cuda" if on_gpus else "cpu", job,
                                              None if similar is None else ray.put(similar),
                                              policies.POLICIES[cfg.policy.name]),
            batch_size=group, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads,
            num_gpus=1 if on_gpus else 0, runtime_env={"env_vars": env},
            # on a local Ray a dead actor (killed for memory, say) is not restarted: the job
            # stops and a re-run resumes from the whole parts. With Ray Data's default (restart
            # forever, retry every task) a deterministic crash looped forever, and its driver
            # logged an error line per actor about restarting from the object store. A cluster
            # (address=) keeps Ray's fault tolerance: a restarted exposure actor recounts the
            # parts on disk.
            **({} if cfg.address else {"max_restarts": 0}),
        )
    rows = []
    with tqdm(total=len(todo), unit="block", desc="scoring", file=sys.stderr, dynamic_ncols=True,
              disable=True if (loud or not cfg.progress) else None) as bar:
        for row in done.iter_rows():
            rows.append(row)
            bar.update(1)
    return rows, actors


def score(cfg: ScoreConfig) -> dict:
    """`distrec score`: every user of `cfg.users` gets a top-k list from the whole catalog (seen items
    excluded), re-ranked by `cfg.policy`, written as Parquet parts into `cfg.out` by Ray actors.
    Resumes a job killed midway (whole parts are kept, each user is scored exactly once); refuses
    an `out` of another job unless `cfg.overwrite`. Returns the summary (also summary.json)."""
    items, out = _check(cfg)
    job, _ = open_out(cfg, out)
    loud = verbose()
    started = time.perf_counter()
    total = user_count(Path(cfg.data), cfg.users)  # the actors read the histories
    blocks = math.ceil(total / cfg.batch_size)
    done, bad = whole_parts(out, job, blocks, total, cfg)
    for path in bad:  # truncated, unreadable, or not this job's block: scored again
        path.unlink()
    todo = [b for b in range(blocks) if b not in done]
    notes = []
    if bad:
        notes.append(f"{len(bad)} part(s) in {out} were incomplete or not this job's ({bad[0].name}"
                     f"{' ...' if len(bad) > 1 else ''}): scored again")
    results = {"block": [], "users": [], "empty": [], "seconds": []}
    actors, embed_seconds = 0, 0.0
    if todo:
        table, popularity, similar = catalog_vectors(cfg, items)
        embed_seconds = time.perf_counter() - started
        with _ray_output(loud):
            rows, actors = _run_blocks(cfg, job, todo, table, popularity, loud, similar)
        for row in rows:
            if row["error"]:
                _raise_actor_error(str(row["error"]))
        for row in rows:
            for key in results:
                results[key].append(row[key])
    seconds = time.perf_counter() - started
    records, _ = whole_parts(out, job, blocks, total, cfg)
    lost = sorted(set(range(blocks)) - set(records))
    if lost:  # every block was scored above: a part gone now was removed meanwhile
        raise ConfigError(f"{out}: the parts of block(s) {lost[:5]} are missing or incomplete after scoring "
                          "(was the directory changed meanwhile?); run the same command again")
    users = int(sum(results["users"]))
    short = sum(r["short_lists"] for r in records.values())
    summary = {
        "out": str(out), "job": job, "users_scored": users, "users_total": total, "blocks": blocks,
        "blocks_skipped": blocks - len(todo), "parts_redone": len(bad), "items": len(items),
        "rows": sum(r["rows"] for r in records.values()),
        # users whose list has fewer than k items: fewer unseen items than k (seen items are
        # never recommended), over the whole job
        "short_lists": short,
        "empty_history_users": int(sum(results["empty"])),
        "seconds": round(seconds, 1), "embed_seconds": round(embed_seconds, 1),
        "users_per_s": round(users / max(seconds - embed_seconds, 1e-9), 1),
        # inside the actors only (start-up of Ray, the actors and their model excluded): the
        # job's rate once running, per the actors working side by side
        "actors": actors if todo else 0,
        "users_per_s_in_blocks": round(users * (actors if todo else 1) / max(sum(results["seconds"]), 1e-9), 1),
        "policy": to_dict(cfg.policy),
    }
    if short:
        notes.append(f"{short:,} of {total:,} users have fewer than k={cfg.k} unseen items among the candidates: "
                     "their lists are shorter (seen items are never recommended; summary.json short_lists)")
    if cfg.policy.name == "exposure":
        summary["exposure"] = exposure_summary(cfg, out, job, items, total, records)
        e = summary["exposure"]
        if e["items_over_cap"]:
            notes.append(f"policy exposure: the cap of {e['cap_per_item']:,} lists per item (strength "
                         f"{cfg.policy.strength} x {total:,} users) could not be kept: {e['users_filled_over_cap']:,} "
                         f"users had too few candidates under it and were filled over it; {e['items_over_cap']:,} "
                         f"items are over it, the most shown one in {e['max_item_share']:.1%} of the users' lists "
                         "(summary.json exposure)")
    summary["warnings"] = notes
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return summary


def exposure_summary(cfg: ScoreConfig, out: Path, job: str, items: pd.DataFrame, users: int, records: dict) -> dict:
    """What the exposure policy achieved over the whole job, from the parts on disk."""
    cap = policies.exposure_capacity(cfg.policy.strength, users)
    counts = exposure_counts(out, job, len(items), items["item_id"])
    return {"cap_per_item": cap, "cap_share": round(cap / max(users, 1), 6),
            "max_item_lists": int(counts.max()) if len(counts) else 0,
            "max_item_share": round(int(counts.max()) / max(users, 1), 6) if len(counts) else 0.0,
            "items_over_cap": int((counts > cap).sum()),
            "users_filled_over_cap": int(sum(r.get("filled_over_cap", 0) for r in records.values()))}


def read_recommendations(out: str | Path) -> pd.DataFrame:
    parts = sorted(Path(out).glob("part-*.parquet"))
    if not parts:
        raise ConfigError(f"{out}: no recommendations (part-*.parquet); run distrec score first")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
