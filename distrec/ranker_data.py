"""`distrec ranker-data`: the ranker's training data, made once from a retrieval run.

    distrec ranker-data --run runs/beauty_text --data data/beauty --out data/beauty_ranker candidates=20 random=4

For every training sample of the dataset (a training prefix and its next item: never a
validation or test target) the retrieval run's top `candidates` items (seen items excluded)
are the hard negatives, the true next item the positive (put in place of the last candidate
when the retriever missed it), and `random` uniform items beside them. Written as WebDataset
shards in the prepared dataset's format, so the training loop reads each exactly once per
epoch per rank. The validation and test users' retrieval candidates (their histories only)
go into val.parquet / test.parquet beside them, for validation during training and the
training run's test. manifest.json records what it was computed from (the retrieval run's
checkpoint, the dataset), and how often the retriever had the positive (its recall).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from distrec.atomic import write_atomic
from distrec.config import ConfigError, doc
from distrec.data.shards import ShardedSamples, write_shards
from distrec.models.run import dataset_identity, read_model_json
from distrec.outputs import check_output, fingerprint_dir, mark_output

FORMAT = "distrec-ranker-samples/1"


@dataclass
class RankerDataConfig:
    run: Optional[str] = doc("the retrieval run (a two-tower run written by distrec train)", default=None)
    data: Optional[str] = doc("the prepared dataset the run was trained on", default=None)
    out: Optional[str] = doc("output directory (shards, val.parquet, test.parquet, manifest.json)", default=None)
    candidates: int = doc("the retriever's top candidates per sample: the hard negatives", default=20)
    random: int = doc("uniform random negatives per training sample beside them", default=4)
    missed: Literal["drop", "insert"] = doc(
        "a training prefix whose positive the retriever did not return: 'drop' it (the ranker only ever "
        "re-orders lists that hold the target, as at test time where a missed target is lost anyway; LlamaRec "
        "trains so), or 'insert' the positive in place of the last candidate", default="drop")
    seed: int = doc("seed of the random negatives", default=0)
    batch_size: int = doc("users per retrieval batch", default=1024)
    samples_per_shard: int = doc("training samples per shard", default=10000)
    overwrite: bool = doc("replace an earlier ranker-data output in `out`", default=False)
    progress: bool = doc("show a progress bar", default=True)

    def __post_init__(self):
        if self.candidates < 1 or self.random < 0 or self.batch_size < 1:
            raise ValueError("candidates >= 1, random >= 0 and batch_size >= 1 required")


def _training_samples(data: Path) -> list[dict]:
    reader = ShardedSamples(data, batch_size=4096, shuffle=False)
    reader.set_epoch(0)
    samples = []
    for batch in reader:
        for key, user, history, length, target in zip(batch["keys"], batch["user"].tolist(), batch["history"],
                                                      batch["length"].tolist(), batch["target"].tolist()):
            samples.append({"key": key, "user": user, "history": history[history.shape[0] - length:].tolist(),
                            "target": target})
    return samples


def _retrieve(retriever, histories: list, batch_size: int, desc: str, progress: bool):
    """(candidates (U, K), user vectors (U, d)) of each history."""
    out, vectors = [], []
    for start in tqdm(range(0, len(histories), batch_size), desc=desc, disable=not progress, leave=False):
        _, candidates, _, users = retriever(histories[start:start + batch_size])
        out.append(candidates.numpy())
        vectors.append(users.float().cpu().numpy())
    return np.concatenate(out), np.concatenate(vectors)


def _scores(users: np.ndarray, table: np.ndarray, candidates) -> list[list[float]]:
    """The retrieval score (user vector . item vector) of each row's candidates."""
    return [np.round(table[np.asarray(c)] @ u, 6).tolist() for u, c in zip(users, candidates)]


def ranker_data(cfg: RankerDataConfig) -> dict:
    """Write the ranker's samples into `cfg.out`; returns the manifest."""
    # the first stage's modules, here only: the trainer imports this module for check_samples
    from distrec.catalog import catalog_vectors
    from distrec.retrieval import Retriever

    if not (cfg.run and cfg.data and cfg.out):
        raise ConfigError("distrec ranker-data needs --run (a retrieval run), --data and --out")
    run, data, out = Path(cfg.run), Path(cfg.data), Path(cfg.out)
    meta = read_model_json(run / "best")
    if meta["model"].get("kind", "two_tower") != "two_tower":
        raise ConfigError(f"--run {run}: is a {meta['model']['kind']} run; the candidates come from a retrieval "
                          "(two-tower) run")
    identity = dataset_identity(data)
    items = pd.read_parquet(data / "items.parquet")
    if meta["item_ids"] != list(items["item_id"]):
        raise ConfigError(f"--run {run} was trained on another catalog ({meta['num_items']:,} items) than --data "
                          f"{data} ({len(items):,}); give the dataset it was trained on")
    replacing = check_output(out, "ranker-data", inputs=[run, data], overwrite=cfg.overwrite)
    started = time.perf_counter()
    table, popularity, _ = catalog_vectors(run, items)
    retriever = Retriever(run, items, torch.from_numpy(table), torch.from_numpy(popularity), cfg.candidates)

    samples = _training_samples(data)
    found, users = _retrieve(retriever, [s["history"] for s in samples], cfg.batch_size, "ranker-data train",
                             cfg.progress)
    rng = np.random.default_rng(cfg.seed)
    hits = np.array([s["target"] in row for s, row in zip(samples, found.tolist())])
    retrieved = len(samples)
    if cfg.missed == "drop":
        samples, found, users = [s for s, h in zip(samples, hits) if h], found[hits], users[hits]
    for sample, row in zip(samples, found):
        row = [int(i) for i in row]
        if sample["target"] not in row:
            row[-1] = sample["target"]  # the positive where the retriever missed it
        taken = set(row) | set(sample["history"])
        extra = []
        while len(extra) < cfg.random and len(taken) < len(items):
            pick = int(rng.integers(len(items)))
            if pick not in taken:
                taken.add(pick)
                extra.append(pick)
        sample["candidates"] = row + extra
    for sample, scores in zip(samples, _scores(users, table, [s["candidates"] for s in samples])):
        sample["scores"] = scores  # for ranker.retrieval_scale: the ranker corrects the first stage

    if replacing:
        for path in [*out.glob("train-*.tar"), out / "val.parquet", out / "test.parquet", out / "manifest.json"]:
            if path.is_file():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "ranker-data", {"run": str(run.resolve()), "data": identity["dir"], "format": FORMAT})
    shards = write_shards(samples, out, cfg.samples_per_shard)
    splits = {}
    for split in ("val", "test"):
        frame = pd.read_parquet(data / f"{split}.parquet")
        cands, vectors = _retrieve(retriever, list(frame["history"]), cfg.batch_size, f"ranker-data {split}",
                                   cfg.progress)
        frame["candidates"] = list(cands)
        frame["scores"] = _scores(vectors, table, cands)
        frame.to_parquet(out / f"{split}.parquet", index=False)
        splits[split] = {"users": len(frame)}
        if split == "val":  # the retrieval ceiling the ranker works under (never read for test)
            targets = frame["target"].to_numpy()
            splits[split]["retrieval_recall"] = round(float((cands == targets[:, None]).any(1).mean()), 6)
    manifest = {
        "format": FORMAT, "shards": shards, "candidates": cfg.candidates, "random": cfg.random, "seed": cfg.seed,
        "retrieval_run": {"dir": str(run.resolve()), "checkpoint_sha256": fingerprint_dir(run / "best"),
                          "backbone": meta["model"].get("backbone"), "item_repr": meta["model"].get("item_repr")},
        "dataset": {k: identity[k] for k in ("dir", "manifest_sha256", "content_sha256", "num_items",
                                             "item_ids_sha256")},
        "train": {"prefixes": retrieved, "samples": len(samples), "missed": cfg.missed,
                  "retrieval_recall": round(float(hits.mean()) if len(hits) else 0.0, 6)},
        **splits, "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(samples_dir: str | Path) -> dict:
    path = Path(samples_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"ranker.samples={samples_dir}: no readable manifest.json; run distrec ranker-data") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"ranker.samples={samples_dir}: not written by distrec ranker-data "
                          f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
    return manifest


def check_samples(samples_dir: str | Path, data_dir: str | Path) -> dict:
    """The samples' manifest, refused in one line when they were made from another dataset."""
    manifest = read_manifest(samples_dir)
    current = dataset_identity(data_dir)
    made = manifest["dataset"]
    if made["manifest_sha256"] != current["manifest_sha256"] and made["content_sha256"] != current["content_sha256"]:
        raise ConfigError(f"ranker.samples={samples_dir} were made from the dataset {made['dir']}, not from "
                          f"data.dir={data_dir} (another content); make them again with distrec ranker-data")
    return manifest
