"""`distrec prepare`: real logs (or the synthetic generator) -> a validated, split, sharded dataset.

    distrec prepare --source recbole --input ml-1m/ --out data/ml-1m
    distrec prepare --source p5 --input ../shared/data/amazon-beauty --out data/beauty
    distrec prepare --source synthetic --out data/synthetic synthetic.num_users=5000

Output directory (written to a temporary sibling, renamed into place at the very end, so a
crash never leaves a directory that looks complete):
    items.parquet  users.parquet  val.parquet  test.parquet  train-00000.tar ...
    manifest.json  config.yaml
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distrec import __version__
from distrec.atomic import publish_dir
from distrec.config import save_config, to_dict
from distrec.data import readers, synthetic
from distrec.data.config import PrepareConfig
from distrec.data.dataset import Dataset, build
from distrec.formats import DATA_FORMAT, DataError
from distrec.data.shards import write_shards
from distrec.outputs import check_output, mark_output

READERS = {
    "recbole": readers.read_recbole,
    "movielens": readers.read_movielens,
    "p5": readers.read_p5,
    "table": readers.read_table,
    "synthetic": lambda cfg: synthetic.generate(cfg.synthetic),
}


def training_samples(data: Dataset, cfg: PrepareConfig) -> list[dict]:
    """One sample per user (history -> last training item) or per prefix, shuffled by seed."""
    limit = cfg.shards.max_history
    samples = []
    for user, seq in enumerate(data.train):
        if len(seq) < 2:
            continue  # a single item has no target
        targets = range(1, len(seq)) if cfg.shards.samples == "prefix" else [len(seq) - 1]
        for t in targets:
            start = max(0, t - limit) if limit else 0
            samples.append({"key": f"u{user:09d}t{t:06d}", "user": user, "history": seq[start:t], "target": seq[t]})
    order = np.random.default_rng(cfg.shards.seed).permutation(len(samples))
    return [samples[i] for i in order]


def _write_parquet(frame, path: Path, schema: pa.Schema) -> None:
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), path)


ITEMS_SCHEMA = pa.schema([("index", pa.int32()), ("item_id", pa.string()), ("title", pa.string()),
                          ("text", pa.string()), ("categories", pa.list_(pa.string())),
                          ("held_out", pa.bool_()), ("train_count", pa.int64())])
USERS_SCHEMA = pa.schema([("index", pa.int32()), ("user_id", pa.string())])
EVAL_SCHEMA = pa.schema([("user", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())])
TEST_SCHEMA = EVAL_SCHEMA.append(pa.field("cold_target", pa.bool_()))


def _staging_dir(out: Path, cfg: PrepareConfig) -> Path:
    """A fresh temporary sibling of `out`, after `check_output` said `out` may be written:
    never an input or a folder holding one, never a folder distrec prepare did not write
    (whatever --overwrite says), an earlier output only with --overwrite."""
    inputs = [] if cfg.source == "synthetic" else [cfg.input, cfg.items]
    check_output(out, "prepare", inputs=inputs, flag="--overwrite", overwrite=cfg.overwrite, error=DataError)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as e:
        raise DataError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    return staging


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished staging directory into place; the old output survives until then."""
    publish_dir(staging, out)


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole stage; return the manifest (also written to `cfg.out/manifest.json`)."""
    if cfg.out is None:
        raise DataError("no output directory: pass --out DIR")
    if cfg.source != "synthetic" and cfg.input is None:
        raise DataError(f"--input is required for source {cfg.source!r}")
    if cfg.source != "synthetic" and not Path(cfg.input).exists():
        raise DataError(f"{cfg.input}: input not found")
    started = time.perf_counter()
    out = Path(cfg.out)
    staging = _staging_dir(out, cfg)
    try:
        source = READERS[cfg.source](cfg)
        data = build(source, cfg)
        samples = training_samples(data, cfg)
        shards = write_shards(samples, staging, cfg.shards.samples_per_shard, cfg.progress)
        _write_parquet(data.items, staging / "items.parquet", ITEMS_SCHEMA)
        _write_parquet(data.users, staging / "users.parquet", USERS_SCHEMA)
        _write_parquet(data.val, staging / "val.parquet", EVAL_SCHEMA)
        _write_parquet(data.test, staging / "test.parquet", TEST_SCHEMA)
        manifest = {
            "format": DATA_FORMAT,
            "distrec_version": __version__,
            "source": cfg.source,
            "num_users": len(data.users),
            "num_items": len(data.items),
            "num_interactions": data.num_interactions,
            "rows_read": source.interaction_counts.rows_read,
            "rows_rejected": source.interaction_counts.rows_rejected,
            "rejections": dict(sorted(source.interaction_counts.rejections.items())),
            "rejected_examples": source.interaction_counts.examples,
            "catalog": {**source.item_counts.as_dict(), "present": source.items is not None},
            "steps": data.steps,
            "ordered_by": source.ordered_by,
            "notes": {**source.notes, **data.notes},
            "splits": {
                "mode": cfg.split.mode,
                "train": {"users": int(sum(len(s) > 0 for s in data.train)),
                          "interactions": int(sum(len(s) for s in data.train)), "samples": len(samples)},
                "val": {"users": len(data.val), "file": "val.parquet"},
                "test": {"users": len(data.test), "cold_targets": int(data.test["cold_target"].sum()),
                         "file": "test.parquet"},
                "held_out_items": int(data.items["held_out"].sum()),
            },
            "shards": shards,
            "sources": source.files,
            "config": to_dict(cfg),
            "seconds": None,
        }
        save_config(cfg, staging / "config.yaml")
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        mark_output(staging, "prepare", {f["path"]: f["sha256"] for f in source.files})
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
