"""`distrec score`: every user's top-K over the whole catalog, re-ranked for diversity, as a
Ray Data job (a local Ray by default, a cluster with `address=`).

    distrec score --run runs/ml1m_id --data data/ml-1m-sasrec --out recs/ml1m policy.name=mmr policy.strength=0.3

The catalog is embedded once on the driver and shared with the scoring actors as one
object reference. Users go in blocks; each actor loads the model once, scores a block
against the catalog (blocked matrix product, running top-N, history excluded), applies
the policy and writes the block's Parquet part atomically (temp file, rename). A part on
disk is the block's completion marker, so a killed job re-run skips finished blocks and
ends with every user exactly once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distrec.atomic import write_atomic
from distrec import diversity
from distrec.config import ConfigError, to_dict
from distrec.data.rows import DataError
from distrec.data.shards import left_pad
from distrec.models.run import load_model, read_model_json
from distrec.score.config import ScoreConfig
from distrec.score.kernel import FaissTopK, top_candidates

SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("rank", pa.int32()),
                    ("score", pa.float32()), ("relevance", pa.float32()), ("policy", pa.string())])
PART = "part-{:05d}.parquet"
JOB_FILE = "job.json"


def primary_categories(items: pd.DataFrame, level: int) -> tuple[torch.Tensor, list[str]]:
    """(I,) category id of each item at `level` of its category list (-1: none), and the names."""
    names: dict[str, int] = {}
    ids = []
    for cats in items["categories"]:
        cats = list(cats)
        if not cats:
            ids.append(-1)
            continue
        name = cats[level] if -len(cats) <= level < len(cats) else cats[-1]
        ids.append(names.setdefault(name, len(names)))
    return torch.tensor(ids, dtype=torch.long), list(names)


def user_frame(data_dir: Path, which: str) -> pd.DataFrame:
    """user, history (the history the lists are built from, an integer array) for the chosen users."""
    if which in ("test", "val"):
        return pd.read_parquet(data_dir / f"{which}.parquet", columns=["user", "history"])
    # every user: the test history and target; users without a test interaction keep their
    # training prefix (empty if none). Vectorised over the flat item column: a list per
    # user built in Python took 0.4 s per 100,000 users, on the driver and in every actor.
    test = pq.read_table(data_dir / "test.parquet", columns=["user", "history", "target"])
    column = test["history"].combine_chunks()
    lengths = np.diff(column.offsets.to_numpy()) + 1
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    is_target = np.zeros(len(flat), dtype=bool)
    is_target[ends - 1] = True
    flat[is_target] = test["target"].to_numpy()
    flat[~is_target] = column.flatten().to_numpy()
    full = dict(zip(test["user"].to_numpy().tolist(), np.split(flat, ends[:-1]) if len(ends) else []))
    users = pd.read_parquet(data_dir / "users.parquet", columns=["index"])["index"]
    none = np.empty(0, dtype=np.int64)
    return pd.DataFrame({"user": users, "history": [full.get(u, none) for u in users.tolist()]})


def user_count(data_dir: Path, which: str) -> int:
    """How many users user_frame returns, from the Parquet footer (2 s saved at 1M users)."""
    return pq.ParquetFile(data_dir / (f"{which}.parquet" if which in ("test", "val") else "users.parquet")).metadata.num_rows


class BlockScorer:
    """Scores blocks of users and writes their parts; constructed once per Ray actor."""

    def __init__(self, cfg_dict: dict, catalog: np.ndarray, popularity: np.ndarray, device: str = "cpu"):
        from distrec.config import from_dict

        self.cfg = from_dict(ScoreConfig, cfg_dict)
        torch.set_num_threads(int(os.environ.get("DISTREC_SCORE_THREADS", max(1, torch.get_num_threads()))))
        data = Path(self.cfg.data)
        self.items = pd.read_parquet(data / "items.parquet")
        self.item_ids = pa.array(self.items["item_id"], pa.string())  # once: converting it cost ~4 ms a block
        self.user_ids = pq.read_table(data / "users.parquet", columns=["user_id"])["user_id"].combine_chunks().cast(pa.string())
        self.frame = user_frame(data, self.cfg.users)
        if not isinstance(catalog, np.ndarray):  # an ObjectRef: the one shared copy in the object store
            import ray

            catalog, popularity = ray.get(catalog), ray.get(popularity)
        self.table = torch.from_numpy(np.array(catalog))
        self.popularity = torch.from_numpy(np.array(popularity))
        self.categories, self.category_names = primary_categories(self.items, self.cfg.category_level)
        self.model = load_model(Path(self.cfg.run) / "best", self.items, Path(self.cfg.run) / "tokenizer")
        # on a GPU actor (Ray sets CUDA_VISIBLE_DEVICES to its GPU) the user tower and the
        # product run there; re-ranking and the parts stay on the CPU with the lists
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.device_table = self.table.to(self.device)
        self.shown = torch.zeros(len(self.items), dtype=torch.long)  # exposure policy state
        self.faiss = FaissTopK(self.table) if self.cfg.faiss else None
        self.out = Path(self.cfg.out)

    def __call__(self, batch: dict) -> dict:
        done = {"block": [], "users": [], "empty": [], "seconds": [], "error": []}
        for block in batch["block"]:
            started = time.perf_counter()
            try:
                users, empty = self.score_block(int(block))
                error = ""
            except (OSError, DataError, ConfigError) as e:
                # returned, not raised: Ray Data's wrappers drop the cause on the way to the
                # driver, which re-raises it as the CLI's one-line error (a full disk, say)
                users, empty, error = 0, 0, json.dumps({"type": type(e).__name__, "errno": getattr(e, "errno", None),
                                                        "strerror": getattr(e, "strerror", None),
                                                        "filename": getattr(e, "filename", None), "message": str(e)})
            done["block"].append(int(block))
            done["users"].append(users)
            done["empty"].append(empty)
            done["seconds"].append(time.perf_counter() - started)
            done["error"].append(error)
        return {k: np.asarray(v) for k, v in done.items()}

    def block_users(self, block: int) -> pd.DataFrame:
        size = self.cfg.batch_size
        return self.frame.iloc[block * size:(block + 1) * size]

    @torch.no_grad()
    def candidates(self, histories: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(relevance (B, N), candidates (B, N), users with an empty history): each user's top-N
        of the whole catalog, seen items excluded; the most popular items for empty histories."""
        cfg = self.cfg
        history = left_pad(histories, 0)
        empty = torch.tensor([len(h) == 0 for h in histories])
        on_device = history.to(self.device)
        user_vectors = self.model.user_vectors(on_device, self.device_table)
        if self.faiss is not None:
            relevance, candidates = self.faiss(user_vectors.cpu(), cfg.candidates, history)
        else:
            relevance, candidates = top_candidates(user_vectors.float(), self.device_table.float(), cfg.candidates,
                                                   on_device, precision=cfg.precision)
            relevance, candidates = relevance.cpu(), candidates.cpu()
        if empty.any():  # nothing to go on: the most popular items
            pop, pop_items = self.popularity.float().topk(min(cfg.candidates, len(self.popularity)))
            relevance[empty], candidates[empty] = pop, pop_items
        return relevance, candidates, int(empty.sum())

    @torch.no_grad()
    def recommend(self, histories: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(items (B, k), relevance (B, k), users with an empty history) for a list of histories."""
        relevance, candidates, empty = self.candidates(histories)
        picks = self.rerank(relevance, candidates, histories)
        return candidates.gather(1, picks), relevance.gather(1, picks), empty

    def rerank(self, relevance, candidates, histories) -> torch.Tensor:
        p, k = self.cfg.policy, self.cfg.k
        if p.name == "none":
            return diversity.top_k(relevance, k)
        if p.name == "mmr":
            return diversity.mmr(relevance, self.table[candidates], k, p.strength)
        if p.name == "dpp":
            return diversity.dpp(relevance, self.table[candidates], k, p.strength, p.window)
        cats = self.categories[candidates]
        if p.name == "category_cap":
            return diversity.category_cap(relevance, cats, k, int(p.strength))
        if p.name == "calibration":
            profile = diversity.category_profile(histories, self.categories, len(self.category_names))
            return diversity.calibrated(relevance, cats, profile, k, p.strength)
        capacity = max(1, math.ceil(p.strength * len(self.frame)))
        return diversity.exposure_capped(relevance, candidates, k, capacity, self.shown)

    def score_block(self, block: int) -> tuple[int, int]:
        users = self.block_users(block)
        items, relevance, empty = self.recommend(list(users["history"]))
        n, k = items.shape
        # Arrow columns built by take() from the id arrays, not through a pandas frame of
        # Python strings: a block's part went from ~10 to ~5 ms per 1,024 users x 20
        table = pa.Table.from_arrays([
            self.user_ids.take(np.repeat(users["user"].to_numpy(), k)),
            self.item_ids.take(items.reshape(-1).numpy()),
            pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)),
            pa.array(np.tile(((k - np.arange(k)) / k).astype(np.float32), n)),
            pa.array(relevance.reshape(-1).numpy().astype(np.float32)),
            pa.array([self.cfg.policy.name]).take(np.zeros(n * k, dtype=np.int32)),
        ], schema=SCHEMA)
        temp = self.out / f".{PART.format(block)}.tmp-{os.getpid()}"
        fault = os.environ.get(FAULT_ENV)  # fault injection for the tests (an errno name, e.g. ENOSPC)
        if fault:
            code = getattr(errno, fault)
            raise OSError(code, os.strerror(code), str(temp))
        pq.write_table(table, temp)
        os.replace(temp, self.out / PART.format(block))
        return n, empty


FAULT_ENV = "DISTREC_FAULT_SCORE_WRITE"
BLOCKS_PER_TASK = 8


def _raise_actor_error(error: str) -> None:
    """Re-raise in the driver an error an actor returned (see BlockScorer.__call__)."""
    e = json.loads(error)
    if e["errno"] is not None:  # the parts already written are whole; a re-run resumes
        raise OSError(e["errno"], e["strerror"], e["filename"])
    raise (DataError if e["type"] == "DataError" else ConfigError)(e["message"])


def _job_id(cfg: ScoreConfig) -> str:
    """What makes two runs the same job (so a re-run may resume it)."""
    keys = {k: v for k, v in to_dict(cfg).items() if k not in ("address", "actors", "device", "progress", "overwrite")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


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
    out = Path(cfg.out)
    job_file = out / JOB_FILE
    if out.exists() and any(out.iterdir()):
        if not job_file.is_file():
            raise ConfigError(f"{out}: exists and is not a distrec score output; choose another --out")
        previous = json.loads(job_file.read_text())
        if previous["job"] != _job_id(cfg):
            if not cfg.overwrite:
                raise ConfigError(f"{out}: holds the results of a different scoring job; pass --overwrite or another --out")
            for part in out.glob("part-*.parquet"):
                part.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(job_file, json.dumps({"job": _job_id(cfg), "config": to_dict(cfg)}, indent=2))
    return items, out


def catalog_and_popularity(cfg: ScoreConfig, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The catalog's item vectors, embedded once (batched through the item tower), on the
    driver's GPU when it has one and `device` allows: a text catalog is most of the work."""
    model = load_model(Path(cfg.run) / "best", items, Path(cfg.run) / "tokenizer")
    if cfg.device != "cpu" and torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    with torch.no_grad():
        model.refresh_cache()
        table = model.item_table().float().cpu().numpy()
    popularity = np.log1p(items["train_count"].to_numpy().astype(np.float32))
    return table, popularity


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


def score(cfg: ScoreConfig) -> dict:
    import ray

    items, out = _check(cfg)
    started = time.perf_counter()
    total = user_count(Path(cfg.data), cfg.users)  # the actors read the histories
    blocks = math.ceil(total / cfg.batch_size)
    todo = [b for b in range(blocks) if not (out / PART.format(b)).exists()]
    table, popularity = catalog_and_popularity(cfg, items)
    embed_seconds = time.perf_counter() - started
    results = {"block": [], "users": [], "empty": [], "seconds": []}
    actors = 0
    if todo:
        if not ray.is_initialized():
            # no address: a fresh local Ray, never a cluster `ray start` left running on this machine
            ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=False,
                     **({} if cfg.address else {"num_cpus": os.cpu_count()}))
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]
        node_cpus, node_gpus = [int(n.get("CPU", 0)) for n in nodes], [int(n.get("GPU", 0)) for n in nodes]
        if cfg.device == "cuda" and not any(node_gpus):
            raise ConfigError("device=cuda: the Ray cluster has no GPUs; use device=auto or cpu")
        on_gpus = cfg.device != "cpu" and any(node_gpus)
        one = cfg.policy.name == "exposure"  # it counts exposure across all users: one actor
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
        done = dataset.map_batches(
            BlockScorer, fn_constructor_args=(to_dict(cfg), ray.put(table), ray.put(popularity),
                                              "cuda" if on_gpus else "cpu"),
            batch_size=group, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads, num_gpus=1 if on_gpus else 0,
            runtime_env={"env_vars": env},
        ).take_all()
        for row in done:
            if row["error"]:
                _raise_actor_error(str(row["error"]))
        for row in done:
            for key in results:
                results[key].append(row[key])
    seconds = time.perf_counter() - started
    users = int(sum(results["users"]))
    summary = {
        "out": str(out), "users_scored": users, "users_total": total, "blocks": blocks,
        "blocks_skipped": blocks - len(todo), "items": len(items), "empty_history_users": int(sum(results["empty"])),
        "seconds": round(seconds, 1), "embed_seconds": round(embed_seconds, 1),
        "users_per_s": round(users / max(seconds - embed_seconds, 1e-9), 1),
        # inside the actors only (start-up of Ray, the actors and their model excluded): the
        # job's rate once running, per the actors working side by side
        "actors": actors if todo else 0,
        "users_per_s_in_blocks": round(users * (actors if todo else 1) / max(sum(results["seconds"]), 1e-9), 1),
        "policy": to_dict(cfg.policy),
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def read_recommendations(out: str | Path) -> pd.DataFrame:
    parts = sorted(Path(out).glob("part-*.parquet"))
    if not parts:
        raise ConfigError(f"{out}: no recommendations (part-*.parquet); run distrec score first")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
