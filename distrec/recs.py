"""Reading a `distrec score` output back: the lists, checked to be one whole job on one dataset.

A recommendations folder holds `part-NNNNN.parquet` (one per block of users, each with a
record of its job and block in the Parquet footer), `job.json` (the config and, since
issue 14, "inputs": what the parts were computed from) and, once the job finished,
`summary.json` (how many blocks there are). `read_recommendations` refuses, in one line:
lists scored on another dataset than the one given, a job that did not finish (a block
missing), a user in more than one part (a copied part, parts of two jobs), a part of
another job, a part that does not read. It needs only pyarrow (no Ray, no model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from distrec.config import ConfigError
from distrec.outputs import fingerprint_file

PART_NAME = re.compile(r"part-(\d{5})\.parquet")
PART_KEY = b"distrec"  # the part's record in its footer (as distrec.score.job writes it)
COLUMNS = ("user_id", "item_id", "rank")
FINISH = "re-run distrec score with the same arguments to finish the job"
AGAIN = "re-run distrec score with the same arguments: it scores that block again"


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: does not read as JSON ({e}); {FINISH}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: is not a distrec score record (expected a JSON object); {FINISH}")
    return record


def _sha(path: Path) -> str | None:
    return fingerprint_file(path) if path.is_file() else None


def check_dataset(recs_dir: Path, data_dir: Path, job: dict | None) -> list[str]:
    """Refuse lists scored on another dataset than `data_dir`; [warnings]. By the manifest's
    sha256 recorded in job.json "inputs"; for older job.json files, by the dataset path."""
    if job is None:
        return [f"{recs_dir}: no job.json (not written by distrec score?): the dataset these lists were made from "
                "and the number of parts cannot be checked"]
    here = data_dir / "manifest.json"
    inputs = job.get("inputs") or {}
    recorded = inputs.get("data") or (job.get("config") or {}).get("data")
    if inputs.get("dataset_manifest_sha256"):
        mine = _sha(here)
        if mine != inputs["dataset_manifest_sha256"]:
            why = (f"manifest sha256 {inputs['dataset_manifest_sha256'][:12]}, here "
                   f"{mine[:12] if mine else 'no manifest.json'}")
            raise ConfigError(f"{recs_dir}: these lists were scored on the dataset {recorded}, not on {data_dir} ({why}); "
                              f"evaluate with --data {recorded}, or score {data_dir} again")
        return []
    if not recorded:
        return [f"{recs_dir}/job.json: records no dataset: which dataset these lists were made from cannot be checked"]
    source = Path(recorded).expanduser()
    if source.resolve() == data_dir.resolve():
        return []
    if source.is_dir():  # a copy of the same dataset has the same manifest
        theirs, mine = _sha(source / "manifest.json"), _sha(here)
        if theirs is not None and theirs == mine:
            return []
        raise ConfigError(f"{recs_dir}: these lists were scored on the dataset {recorded}, not on {data_dir} "
                          f"(their manifests differ); evaluate with --data {recorded}, or score {data_dir} again")
    return [f"{recs_dir}/job.json: the lists were scored on {recorded}, which is gone: that {data_dir} is the same "
            "dataset cannot be checked"]


def _read_part(path: Path) -> tuple[pd.DataFrame, dict | None]:
    """The part's rows and its footer record (None for parts of older distrec versions)."""
    try:
        meta = pq.read_metadata(path)
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: does not read as Parquet ({first}): truncated or corrupt; {AGAIN}") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(f"{path}: not a recommendations part (no column(s) {', '.join(missing)}); "
                          "remove it, or evaluate the folder distrec score wrote")
    record = None
    if meta.metadata and PART_KEY in meta.metadata:
        try:
            record = json.loads(meta.metadata[PART_KEY])
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("rows") not in (None, meta.num_rows):
            raise ConfigError(f"{path}: holds {meta.num_rows} rows where its record says {record['rows']}: "
                              f"incomplete; {AGAIN}")
    return table.select(list(COLUMNS)).to_pandas(), record if isinstance(record, dict) else None


def _no_user_twice(frames: list[pd.DataFrame], parts: list[Path], recs_dir: Path) -> None:
    pairs = pd.concat([pd.DataFrame({"user_id": f["user_id"].unique(), "part": i}) for i, f in enumerate(frames)],
                      ignore_index=True)
    twice = pairs[pairs["user_id"].duplicated(keep=False)]
    if len(twice):
        users = twice["user_id"].nunique()
        user = twice["user_id"].iloc[0]
        named = sorted({parts[i].name for i in twice.loc[twice["user_id"] == user, "part"]})
        all_named = sorted({parts[i].name for i in twice["part"]})
        more = f" ({len(all_named)} parts in all)" if len(all_named) > len(named) else ""
        raise ConfigError(f"{recs_dir}: {users:,} user(s) appear in more than one part, e.g. user {user} in "
                          f"{' and '.join(named)}{more}; a part was copied or two jobs' parts were mixed: remove the "
                          "extra part(s), or re-run distrec score into an empty --out")


def read_recommendations(recs_dir: str | Path, data_dir: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """(user_id, item_id, rank) of every part in `recs_dir`, and what they are: {"job",
    "policy", "parts", "blocks", "data", "run", "warnings"}. With `data_dir`, refuses lists
    scored on another dataset (check_dataset)."""
    recs_dir = Path(recs_dir)
    if not recs_dir.is_dir():
        raise ConfigError(f"{recs_dir}: not found (a folder written by distrec score); run distrec score first")
    parts = sorted(recs_dir.glob("part-*.parquet"))
    job = _json(recs_dir / "job.json")
    summary = _json(recs_dir / "summary.json")
    warnings = check_dataset(recs_dir, Path(data_dir), job) if data_dir is not None else []
    config = (job or {}).get("config") or {}
    if config.get("users", "test") != "test":
        raise ConfigError(f"{recs_dir}: these lists were scored for users={config['users']} (histories that are not "
                          "the test users' train + validation); evaluate measures the test targets: score with users=test")
    if job is not None and summary is None:
        raise ConfigError(f"{recs_dir}: the scoring job did not finish (no summary.json; {len(parts)} part(s) "
                          f"written); {FINISH}")
    if summary is not None and job is not None and summary.get("job") not in (None, job.get("job")):
        raise ConfigError(f"{recs_dir}: summary.json is of another scoring job than job.json (the job was restarted "
                          f"and did not finish); {FINISH}")
    if not parts:
        raise ConfigError(f"{recs_dir}: no recommendations (part-*.parquet); run distrec score first")
    frames, blocks = [], {}
    for path in parts:
        frame, record = _read_part(path)
        if record is not None and job is not None and record.get("job") not in (None, job.get("job")):
            raise ConfigError(f"{path}: is a part of another scoring job than {recs_dir / 'job.json'} (copied in?); "
                              "remove it, or re-run distrec score into an empty --out")
        named = PART_NAME.fullmatch(path.name)
        block = record.get("block") if record is not None else (int(named.group(1)) if named else None)
        if block is not None:
            blocks.setdefault(block, []).append(path.name)
        frames.append(frame)
    _no_user_twice(frames, parts, recs_dir)
    twice = {b: names for b, names in blocks.items() if len(names) > 1}
    if twice:
        block, names = min(twice.items())
        raise ConfigError(f"{recs_dir}: block {block} is in more than one part ({' and '.join(names)}); "
                          "remove the copy")
    expected = (summary or {}).get("blocks")
    if isinstance(expected, int):
        missing = sorted(set(range(expected)) - set(blocks))
        if missing:
            shown = ", ".join(f"part-{b:05d}.parquet" for b in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ConfigError(f"{recs_dir}: {len(missing)} of {expected} parts are missing ({shown}); {FINISH}")
    recs = pd.concat(frames, ignore_index=True)
    if recs.duplicated(["user_id", "rank"]).any():
        row = recs[recs.duplicated(["user_id", "rank"])].iloc[0]
        raise ConfigError(f"{recs_dir}: user {row['user_id']} has two items at rank {row['rank']}; "
                          "re-run distrec score into an empty --out")
    inputs = (job or {}).get("inputs") or {}
    info = {"job": (job or {}).get("job"), "policy": (summary or {}).get("policy") or config.get("policy"),
            "parts": len(parts), "blocks": expected, "data": inputs.get("data") or config.get("data"),
            "run": inputs.get("run") or config.get("run"), "warnings": warnings}
    return recs, info
