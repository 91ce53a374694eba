"""A scoring job's output folder: what a job is (its config and the content of what its parts
are computed from), its parts (a whole part is its block's completion marker: the footer
records the job, the block, its users and rows), and opening a folder for a job (resume the
same job; refuse or, with --overwrite, replace another's own files). distrec.score.job runs
the job; distrec.score.actor writes the parts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distrec.atomic import write_atomic
from distrec.config import ConfigError, to_dict
from distrec.outputs import check_output, fingerprint_dir, fingerprint_file, mark_output
from distrec.score.config import ScoreConfig

SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("rank", pa.int32()),
                    ("score", pa.float32()), ("relevance", pa.float32()), ("policy", pa.string()),
                    # the first stage's score of the item (= relevance without a ranker)
                    ("retrieval_score", pa.float32())])
# with a ranker: each user's retrieval candidates, one file per block beside its part
CANDIDATE_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("retrieval_rank", pa.int32())])
CANDIDATES = "candidates-{:05d}.parquet"

PART = "part-{:05d}.parquet"

JOB_FILE = "job.json"

PART_KEY = b"distrec"  # the part's record in its Parquet footer (key-value metadata)



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
    ranker = Path(cfg.ranker.run) if cfg.ranker.run else None
    return {
        "run": str(run.resolve()), "data": str(data.resolve()),
        "ranker_run": str(ranker.resolve()) if ranker else None,
        "ranker_checkpoint_sha256": fingerprint_dir(ranker / "best") if ranker else None,
        "checkpoint_sha256": fingerprint_dir(run / "best"),
        "tokenizer_sha256": fingerprint_dir(run / "tokenizer") if (run / "tokenizer").is_dir() else None,
        "dataset_manifest_sha256": manifest_sha, "dataset_format": data_format,
        "dataset_files_sha256": fingerprint_dir(data, read),
    }



IDENTITY = ("checkpoint_sha256", "tokenizer_sha256", "dataset_manifest_sha256", "dataset_files_sha256",
            "ranker_checkpoint_sha256")

NOT_IDENTITY = ("address", "actors", "device", "progress", "overwrite")  # how it runs, not what it computes



def _job_config(cfg: ScoreConfig) -> dict:
    # without a ranker its section is left out: a retrieval-only job keeps the identity it had
    # before the ranker existed, so such an output resumes across the upgrade (likewise a
    # two-stage job without ranker.new_items, which came later)
    config = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IDENTITY and not (k == "ranker" and not cfg.ranker.run)}
    if "ranker" in config and not cfg.ranker.new_items:
        config["ranker"] = {k: v for k, v in config["ranker"].items() if k != "new_items"}
    return config


def _job_id(cfg: ScoreConfig, inputs: dict) -> str:
    """What makes two runs the same job (so a re-run may resume it): the config and the
    content of what the parts are computed from (job_inputs)."""
    keys = {"config": _job_config(cfg), **{k: inputs.get(k) for k in IDENTITY
                                           if k != "ranker_checkpoint_sha256" or inputs.get(k)}}
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
    if old_inputs.get("ranker_checkpoint_sha256") != inputs.get("ranker_checkpoint_sha256"):
        said.append(f"the ranker checkpoint changed (ranker.run {cfg.ranker.run})")
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
    return [p for p in [*out.glob("part-*.parquet"), *out.glob(".part-*.parquet.tmp-*"), *out.glob("candidates-*.parquet"),
                        *out.glob(".candidates-*.parquet.tmp-*"), out / "summary.json", out / JOB_FILE] if p.is_file()]


def open_out(cfg: ScoreConfig, out: Path) -> tuple[str, dict]:
    """Make `out` this job's output: (job id, inputs). Resumes the same job; refuses, before
    anything is written, a directory that is or holds an input, one distrec score did not
    write, or another job's output without --overwrite (which removes that job's own files,
    nothing else)."""
    inputs = job_inputs(cfg)
    job = _job_id(cfg, inputs)
    if check_output(out, "score", inputs=[cfg.run, cfg.data, cfg.ranker.run], flag="--overwrite", overwrite=None):
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

