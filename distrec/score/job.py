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
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distrec.atomic import write_atomic
from distrec import catalog, policies
from distrec.catalog import primary_categories
from distrec.config import ConfigError, to_dict
from distrec.console import verbose  # DISTREC_VERBOSE=1 (--verbose): Ray's own logs, actor output and bars
from distrec.formats import DataError
from distrec.models.run import read_model_json
from distrec.outputs import check_output, fingerprint_dir, fingerprint_file, mark_output
from distrec.score.config import ScoreConfig
from distrec.retrieval import Retriever

SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("rank", pa.int32()),
                    ("score", pa.float32()), ("relevance", pa.float32()), ("policy", pa.string())])
PART = "part-{:05d}.parquet"
JOB_FILE = "job.json"
PART_KEY = b"distrec"  # the part's record in its Parquet footer (key-value metadata)


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

    def __init__(self, cfg_dict: dict, catalog: np.ndarray, popularity: np.ndarray, device: str = "cpu",
                 job: str | None = None, similar: np.ndarray | None = None, policy: policies.Policy | None = None):
        """`policy`: the driver's registry entry for cfg_dict's policy. A Ray actor imports the
        package's own registry; an entry registered at run time in the driver (a plugin, a test)
        reaches it this way (Ray pickles it with cloudpickle)."""
        from distrec.config import from_dict

        if policy is not None and policy.name not in policies.POLICIES:
            policies.register(policy)
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
            similar = None if similar is None else ray.get(similar)
        self.table = torch.from_numpy(np.array(catalog))
        self.popularity = torch.from_numpy(np.array(popularity))
        self.categories, self.category_names = primary_categories(self.items, self.cfg.category_level)
        # what mmr and dpp call alike (policy.similarity): the item vectors, or the given ones
        self.similar = self.table if similar is None else torch.from_numpy(np.array(similar))
        # new items (no training interaction), for new_item_slots: their indices, and each item's place among them
        counts = self.items["train_count"].to_numpy() if "train_count" in self.items else np.ones(len(self.items))
        self.new_items = torch.from_numpy(np.flatnonzero(counts == 0))
        self.new_place = torch.full((len(self.items),), -1, dtype=torch.long)
        self.new_place[self.new_items] = torch.arange(len(self.new_items))
        self.retriever = Retriever(self.cfg.run, self.items, self.table, self.popularity, self.cfg.candidates,
                                   self.cfg.precision, device, self.cfg.faiss)
        # on a GPU actor (Ray sets CUDA_VISIBLE_DEVICES to its GPU) the user tower and the
        # product run there; re-ranking and the parts stay on the CPU with the lists
        self.model, self.device = self.retriever.model, self.retriever.device
        self.device_table = self.retriever.device_table
        self.out = Path(self.cfg.out)
        self.job = job
        # exposure policy state: the lists each item is in across the job, so far. Counted from
        # the parts already written: a resumed job (or this actor restarted by Ray) goes on
        # from what is on disk, not from zero.
        self.shown = torch.zeros(len(self.items), dtype=torch.long)
        if "job" in policies.POLICIES[self.cfg.policy.name].needs and job is not None:
            self.shown += exposure_counts(self.out, job, len(self.items), self.items["item_id"])

    def __call__(self, batch: dict) -> dict:
        done = {"block": [], "users": [], "empty": [], "seconds": [], "error": []}
        for block in batch["block"]:
            started = time.perf_counter()
            try:
                record = self.score_block(int(block))
                users, empty, error = record["users"], record["empty"], ""
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
        relevance, candidates, empty, _ = self._candidates(histories)
        return relevance, candidates, empty

    def _candidates(self, histories: list):
        return self.retriever(histories)

    @torch.no_grad()
    def reserve_new_items(self, items: torch.Tensor, relevance: torch.Tensor, user_vectors: torch.Tensor,
                          histories: list) -> tuple[torch.Tensor, torch.Tensor]:
        """`new_item_slots`: each list (B, k) gets at least that many new items within its first
        `new_item_rank` positions. The user's best-scored new items, unseen and not yet listed,
        go in at the end of that window; the items they displace move down (the last drop off)."""
        slots, window, k = self.cfg.new_item_slots, min(self.cfg.new_item_rank, self.cfg.k), items.shape[1]
        if not slots or not len(self.new_items):
            return items, relevance
        scores = (user_vectors.float() @ self.device_table[self.new_items.to(self.device)].float().T).cpu()
        place = self.new_place[items]
        shown = (place >= 0) & ~torch.isneginf(relevance)
        for row, history in enumerate(histories):
            seen = self.new_place[torch.as_tensor(np.asarray(history, dtype=np.int64))] if len(history) else place[row, :0]
            for hidden in (seen, place[row][shown[row]]):
                scores[row, hidden[hidden >= 0]] = -torch.inf
        need = (slots - shown[:, :window].sum(1)).clamp(min=0)
        best, picks = scores.topk(min(slots, scores.shape[1]), dim=1)
        items, relevance = items.clone(), relevance.clone()
        for row in torch.nonzero(need).flatten().tolist():
            chosen = [j for j in range(int(need[row])) if not torch.isneginf(best[row, j])]
            if not chosen:
                continue
            cut = window - len(chosen)
            new_ids = self.new_items[picks[row, chosen]]
            items[row] = torch.cat([items[row, :cut], new_ids, items[row, cut:]])[:k]
            relevance[row] = torch.cat([relevance[row, :cut], best[row, chosen].to(relevance.dtype), relevance[row, cut:]])[:k]
        return items, relevance

    @torch.no_grad()
    def recommend(self, histories: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(items (B, k), relevance (B, k), users with an empty history) for a list of histories.
        A user with fewer than k unseen candidates has -inf relevance at the end of its row:
        padding (a seen item), never to be shown (score_block drops it)."""
        relevance, candidates, empty, users = self._candidates(histories)
        picks = self.rerank(relevance, candidates, histories)
        items, relevance = self.reserve_new_items(candidates.gather(1, picks), relevance.gather(1, picks), users, histories)
        return items, relevance, empty

    def rerank(self, relevance, candidates, histories, filled: torch.Tensor | None = None) -> torch.Tensor:
        """The policy's picks (B, k) among the candidates (distrec.policies.rerank)."""
        return policies.rerank(self.cfg.policy, policies.Candidates(
            relevance, candidates, self.cfg.k, similar=self.similar, categories=self.categories,
            num_categories=len(self.category_names), histories=histories, shown=self.shown, users=len(self.frame),
            filled=filled))

    def score_block(self, block: int) -> dict:
        """Score one block and write its part; returns the part's record (PART_KEY)."""
        users = self.block_users(block)
        histories = list(users["history"])
        relevance, candidates, empty, user_vectors = self._candidates(histories)
        filled = torch.zeros(len(users), dtype=torch.bool)
        picks = self.rerank(relevance, candidates, histories, filled)
        items, relevance = self.reserve_new_items(candidates.gather(1, picks), relevance.gather(1, picks),
                                                  user_vectors, histories)
        n, k = items.shape
        # -inf relevance is padding (a seen item: the user has fewer unseen candidates than
        # k); every policy puts it last, so dropping it leaves each list shorter, in order
        keep = ~torch.isneginf(relevance)
        lengths = keep.sum(dim=1).numpy()
        kept = keep.numpy()
        ranks = np.cumsum(kept, axis=1, dtype=np.int32)[kept]
        rows = int(lengths.sum())
        # Arrow columns built by take() from the id arrays, not through a pandas frame of
        # Python strings: a block's part went from ~10 to ~5 ms per 1,024 users x 20
        record = {"job": self.job, "block": block, "users": int(n), "rows": rows,
                  "short_lists": int((lengths < self.cfg.k).sum()), "empty": int(empty),
                  "filled_over_cap": int(filled.sum())}
        table = pa.Table.from_arrays([
            self.user_ids.take(np.repeat(users["user"].to_numpy(), lengths)),
            self.item_ids.take(items.numpy()[kept]),
            pa.array(ranks),
            pa.array(((self.cfg.k - ranks + 1) / self.cfg.k).astype(np.float32)),
            pa.array(relevance.numpy()[kept].astype(np.float32)),
            pa.array([self.cfg.policy.name]).take(np.zeros(rows, dtype=np.int32)),
        ], schema=SCHEMA.with_metadata({PART_KEY: json.dumps(record).encode()}))
        temp = self.out / f".{PART.format(block)}.tmp-{os.getpid()}"
        fault = os.environ.get(FAULT_ENV)  # fault injection for the tests (an errno name, e.g. ENOSPC)
        if fault:
            code = getattr(errno, fault)
            raise OSError(code, os.strerror(code), str(temp))
        pq.write_table(table, temp)
        os.replace(temp, self.out / PART.format(block))
        return record


def part_record(path: Path) -> dict | None:
    """The record a part carries in its footer (job, block, users, rows, ...), or None when
    the footer does not read (a truncated or foreign file) or lacks it or disagrees with
    the file's row count."""
    try:
        meta = pq.read_metadata(path)
        record = json.loads(meta.metadata[PART_KEY])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    if not isinstance(record, dict) or record.get("rows") != meta.num_rows:
        return None
    return record


def block_size(block: int, total: int, batch_size: int) -> int:
    return max(0, min(batch_size, total - block * batch_size))


def whole_parts(out: Path, job: str, blocks: int, total: int, cfg: ScoreConfig) -> tuple[dict, list[Path]]:
    """({block: record} for the parts that are whole parts of this job, [the other part files])."""
    done, bad = {}, []
    for path in sorted(out.glob("part-*.parquet")):
        try:
            block = int(path.name[len("part-"):-len(".parquet")])
        except ValueError:
            bad.append(path)
            continue
        record = part_record(path)
        users = block_size(block, total, cfg.batch_size)
        if (record is None or path.name != PART.format(block) or not 0 <= block < blocks or record.get("job") != job
                or record.get("block") != block or record.get("users") != users
                or not 0 <= record["rows"] <= users * cfg.k):
            bad.append(path)
        else:
            done[block] = record
    return done, bad


def exposure_counts(out: Path, job: str, num_items: int, item_ids) -> torch.Tensor:
    """(I,) long: the lists each item is in, over the whole parts of `job` under `out`."""
    index = pd.Index(item_ids)
    counts = np.zeros(num_items, dtype=np.int64)
    for path in sorted(out.glob("part-*.parquet")):
        record = part_record(path)
        if record is None or record.get("job") != job:
            continue
        found = index.get_indexer(pq.read_table(path, columns=["item_id"])["item_id"].to_numpy(zero_copy_only=False))
        np.add.at(counts, found[found >= 0], 1)
    return torch.from_numpy(counts)


FAULT_ENV = "DISTREC_FAULT_SCORE_WRITE"
BLOCKS_PER_TASK = 8


def _raise_actor_error(error: str) -> None:
    """Re-raise in the driver an error an actor returned (see BlockScorer.__call__)."""
    e = json.loads(error)
    if e["errno"] is not None:  # the parts already written are whole; a re-run resumes
        raise OSError(e["errno"], e["strerror"], e["filename"])
    raise (DataError if e["type"] == "DataError" else ConfigError)(e["message"])


def job_inputs(cfg: ScoreConfig) -> dict:
    """What the parts are computed from, by content: the checkpoint (the files of RUN/best,
    and RUN/tokenizer when there is one), the dataset's manifest and the dataset files the
    job reads (sha256 each). Recorded in job.json and the output's marker; part of the job's
    identity, so a retrained run or a re-prepared dataset is another job."""
    run, data = Path(cfg.run), Path(cfg.data)
    manifest = data / "manifest.json"
    manifest_sha, data_format = None, None
    if manifest.is_file():
        manifest_sha = fingerprint_file(manifest)
        try:
            data_format = json.loads(manifest.read_text()).get("format")
        except (ValueError, AttributeError):
            data_format = None
    histories = f"{cfg.users}.parquet" if cfg.users in ("test", "val") else "test.parquet"
    read = ["items.parquet", "users.parquet", histories]  # what the actors read (val.parquet only for users=val)
    return {
        "run": str(run.resolve()), "data": str(data.resolve()),
        "checkpoint_sha256": fingerprint_dir(run / "best"),
        "tokenizer_sha256": fingerprint_dir(run / "tokenizer") if (run / "tokenizer").is_dir() else None,
        "dataset_manifest_sha256": manifest_sha, "dataset_format": data_format,
        "dataset_files_sha256": fingerprint_dir(data, read),
    }


IDENTITY = ("checkpoint_sha256", "tokenizer_sha256", "dataset_manifest_sha256", "dataset_files_sha256")
NOT_IDENTITY = ("address", "actors", "device", "progress", "overwrite")  # how it runs, not what it computes


def _job_config(cfg: ScoreConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_IDENTITY}


def _job_id(cfg: ScoreConfig, inputs: dict) -> str:
    """What makes two runs the same job (so a re-run may resume it): the config and the
    content of what the parts are computed from (job_inputs)."""
    keys = {"config": _job_config(cfg), **{k: inputs.get(k) for k in IDENTITY}}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _what_differs(previous: dict, cfg: ScoreConfig, inputs: dict) -> str:
    """In words, why `previous` (an earlier job.json) is another job."""
    old_inputs = previous.get("inputs") or {}
    if not old_inputs:
        return "written by an older distrec that did not record its checkpoint and dataset"
    said = []
    if old_inputs.get("checkpoint_sha256") != inputs["checkpoint_sha256"] or \
            old_inputs.get("tokenizer_sha256") != inputs["tokenizer_sha256"]:
        said.append(f"the checkpoint {Path(cfg.run) / 'best'} changed since (retrained?)")
    if old_inputs.get("dataset_manifest_sha256") != inputs["dataset_manifest_sha256"] or \
            old_inputs.get("dataset_files_sha256") != inputs["dataset_files_sha256"]:
        said.append(f"the dataset {cfg.data} differs")
    old_config = {k: v for k, v in (previous.get("config") or {}).items() if k not in NOT_IDENTITY}
    new_config = _job_config(cfg)
    changed = [k for k in sorted(set(old_config) | set(new_config)) if old_config.get(k) != new_config.get(k)]
    if changed:
        said.append("other settings: " + ", ".join(f"{k} {old_config.get(k)!r} -> {new_config.get(k)!r}"
                                                   for k in changed[:3]) + (" ..." if len(changed) > 3 else ""))
    return "; ".join(said) or "another job"


def _own_files(out: Path) -> list[Path]:
    """The files a scoring job writes into its --out (its parts, temp parts, summary, job file)."""
    return [p for p in [*out.glob("part-*.parquet"), *out.glob(".part-*.parquet.tmp-*"), out / "summary.json",
                        out / JOB_FILE] if p.is_file()]


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
    return items, Path(cfg.out)


def _open_out(cfg: ScoreConfig, out: Path) -> tuple[str, dict]:
    """Make `out` this job's output: (job id, inputs). Resumes the same job; refuses, before
    anything is written, a directory that is or holds an input, one distrec score did not
    write, or another job's output without --overwrite (which removes that job's own files,
    nothing else)."""
    inputs = job_inputs(cfg)
    job = _job_id(cfg, inputs)
    if check_output(out, "score", inputs=[cfg.run, cfg.data], flag="--overwrite", overwrite=None):
        try:
            previous = json.loads((out / JOB_FILE).read_text())
        except (OSError, ValueError):
            previous = None  # killed between the marker and the job file: nothing scored yet
        if not isinstance(previous, dict):
            previous = {"job": None} if _own_files(out) else {"job": job}
        if previous.get("job") != job:
            if not cfg.overwrite:
                raise ConfigError(f"{out}: holds the results of a different scoring job "
                                  f"({_what_differs(previous, cfg, inputs)}); pass --overwrite to replace them, "
                                  "or choose another --out")
            for path in _own_files(out):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "score", inputs)
    write_atomic(out / JOB_FILE, json.dumps({"job": job, "config": to_dict(cfg), "inputs": inputs}, indent=2))
    return job, inputs


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
    (they stay in Ray's session logs): one bar of our own instead (score). Restored after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
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
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        for handler, level in levels:
            handler.setLevel(level)


def _init_ray(cfg: ScoreConfig, loud: bool) -> None:
    import ray

    if not ray.is_initialized():
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
    job, _ = _open_out(cfg, out)
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
