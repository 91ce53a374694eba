"""Which directories distrec may replace, and what an output was computed from.

Every stage writes a marker, `.distrec-output.json`, into the directory it produces (the
stage, the version, the inputs' fingerprints). Before a stage writes into or replaces a
directory it calls `check_output`, which refuses, whatever `--overwrite` says:
- a directory that is one of the stage's inputs, or holds one (`--out` = the raw data folder
  or its parent deleted the user's CSVs before this check existed);
- the current directory or one above it;
- a non-empty directory without the stage's marker (distrec replaces only what it wrote).

Outputs written before the marker existed are recognised by their own files (`LEGACY`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from distrec import __version__
from distrec.config import ConfigError
from distrec.formats import DATA_FAMILY

MARKER = ".distrec-output.json"
STAGES = ("prepare", "train", "score", "evaluate", "ranker-data")


def _legacy_prepare(d: Path) -> bool:
    try:
        return str(json.loads((d / "manifest.json").read_text()).get("format", "")).startswith(DATA_FAMILY)
    except (OSError, ValueError, AttributeError):
        return False


LEGACY = {  # how each stage's output looked before the marker
    "prepare": _legacy_prepare,
    "train": lambda d: (d / "config.yaml").is_file() and ((d / "best").is_dir() or (d / "last").is_dir()
                                                          or (d / "metrics.jsonl").is_file()),
    "score": lambda d: (d / "job.json").is_file(),
    "evaluate": lambda d: (d / "metrics.json").is_file() or (d / "sweep.json").is_file(),
}


def written_by(directory: str | Path) -> str | None:
    """The stage that wrote `directory` (its marker, or an older output's files), or None."""
    d = Path(directory)
    try:
        stage = json.loads((d / MARKER).read_text()).get("stage")
        if stage in STAGES:
            return stage
    except (OSError, ValueError, AttributeError):
        pass
    return next((stage for stage, looks in LEGACY.items() if d.is_dir() and looks(d)), None)


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_output(out: str | Path, stage: str, inputs: Iterable[str | Path | None] = (), flag: str = "--overwrite",
                 overwrite: bool | None = False, error: type[Exception] = ConfigError) -> bool:
    """May `stage` write `out`? Raises `error` (one line) if not; True when `out` holds an
    earlier output of `stage` (to be replaced or resumed), False when absent or empty.
    `overwrite=None`: the caller decides what to do with its own earlier output (a scoring
    job resuming, `train --resume`); only the refusals that no flag lifts apply."""
    assert stage in STAGES, stage
    target = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if source == target:
            raise error(f"{out}: is the input {given} of this {stage}; distrec never writes over its inputs: "
                        "choose another output directory")
        if target in source.parents:
            raise error(f"{out}: holds the input {given}; distrec never replaces a directory holding its inputs: "
                        "choose another output directory")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise error(f"{out}: is the current directory or one above it; choose another output directory")
    if not target.exists():
        return False
    if not target.is_dir():
        raise error(f"{out}: exists and is not a directory; choose another output directory")
    if not any(target.iterdir()):
        return False
    owner = written_by(target)
    if owner != stage:
        what = f"written by distrec {owner}" if owner else "not written by distrec"
        names = sorted(p.name for p in target.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise error(f"{out}: exists and was {what} (holds {shown}); distrec {stage} replaces only its own outputs: "
                    "choose another output directory")
    if overwrite is False:
        raise error(f"{out}: already holds a distrec {stage} output; pass {flag} to replace it, "
                    "or choose another output directory")
    return True


def mark_output(directory: str | Path, stage: str, inputs: dict | None = None) -> None:
    """Write the marker that lets a later run of `stage` recognise (and replace) this output."""
    from distrec.atomic import write_atomic

    assert stage in STAGES, stage
    record = {"stage": stage, "distrec_version": __version__, "inputs": inputs or {}}
    write_atomic(Path(directory) / MARKER, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_marker(directory: str | Path) -> dict | None:
    """The marker's record, or None when the directory has none (or an unreadable one)."""
    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def fingerprint_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_dir(directory: str | Path, names: Iterable[str] | None = None) -> str:
    """sha256 (hex) over the sorted (relative path, file sha256) pairs of the files under
    `directory` (only `names`, relative paths, when given); hidden files are skipped."""
    root = Path(directory)
    if names is None:
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    else:
        files = sorted(names)
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{fingerprint_file(root / name)}\n".encode())
    return digest.hexdigest()


def same_path(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)
