"""Publishing a finished directory in place of an older one, so that a crash (SIGKILL, power
loss) at any instant leaves either the old or the new directory, whole, under its name or
recoverable by `recover_dir`. Used by every stage that writes a directory (prepare's
output, the `best/` and `last/` checkpoints)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _old(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def staging_for(target: Path) -> Path:
    """Where the next version of `target` is written before `publish_dir` (one writer per
    target, so a fixed name: a crash's leftover is found and removed by the next write)."""
    return Path(target).parent / f".{Path(target).name}.tmp"


def publish_dir(staging: Path, target: Path) -> None:
    """Replace `target` by the finished `staging` directory: two renames, the old one removed
    only after the new one is in place (a rename is atomic, a recursive delete is not)."""
    staging, target = Path(staging), Path(target)
    old = _old(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> bool:
    """After a crash: drop a half-written staging directory, and if the crash fell between
    `publish_dir`'s two renames (`target` missing, the previous version beside it) put the
    previous version back. True when something was recovered."""
    target = Path(target)
    shutil.rmtree(staging_for(target), ignore_errors=True)
    old = _old(target)
    if target.exists() or not old.is_dir():
        return False
    try:
        os.replace(old, target)
    except FileNotFoundError:  # another rank of the same job recovered it first
        return False
    return True


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file whole or not at all: a temp file beside it, then a rename. A reader (or a
    re-run checking whether a stage finished) never sees half a results.json."""
    path = Path(path)
    temp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if isinstance(data, bytes):
            temp.write_bytes(data)
        else:
            temp.write_text(data, encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def savefig_atomic(fig, path: Path, **kwargs) -> None:
    """matplotlib's savefig through `write_atomic` (the format from the name's suffix)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip("."), **kwargs)
    write_atomic(path, buffer.getvalue())
