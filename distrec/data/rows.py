"""Reading delimited text row by row, with every bad row named, counted and never lost.

A malformed row either stops the run with `file:line: what was expected` (the default,
`on_bad_rows=error`) or, with `on_bad_rows=skip`, is dropped and counted by reason in the
manifest. pandas.read_csv cannot do this: with `on_bad_lines` it reports column-count
errors only, not bad numbers or bad encoding, and loses the line numbers after parsing.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

MAX_EXAMPLES = 20  # first bad rows quoted in the manifest, enough to find a pattern
MAX_RECORD_LINES = 16  # a quoted field spanning more lines is an unterminated quote


class DataError(Exception):
    """Input the user must fix. The message names the file, the line and what was expected."""


@dataclass
class RowCounts:
    """What happened to the rows of one kind of input (interactions or catalog)."""

    rows_read: int = 0
    rows_rejected: int = 0
    rejections: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_rejected": self.rows_rejected,
            "rejections": dict(sorted(self.rejections.items())),
            "examples": list(self.examples),
        }


class BadRows:
    """Applies the `on_bad_rows` policy: raise at the first bad row, or count and go on."""

    def __init__(self, policy: str, counts: RowCounts):
        if policy not in ("error", "skip"):
            raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.counts = counts

    def reject(self, path: str | Path, line: int | str, reason: str, detail: str, rows: int = 1) -> None:
        """Reject rows already counted as read."""
        message = f"{path}:{line}: {detail}"
        if self.policy == "error":
            raise DataError(f"{message}\n  (fix the row, or pass on_bad_rows=skip to drop such rows and count them in the manifest)")
        self.counts.rows_rejected += rows
        self.counts.rejections[reason] += rows
        if len(self.counts.examples) < MAX_EXAMPLES:
            self.counts.examples.append(message)


def file_info(path: str | Path) -> dict:
    """Path, size and sha256 of a source file, for the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(Path(path).resolve()), "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} must be a file, found a directory")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: {what} is empty (expected a header and rows)")
    return path


def iter_records(
    path: str | Path,
    *,
    delimiter: str,
    encoding: str,
    bad: BadRows,
    quoting: bool = True,
    progress: bool = False,
) -> Iterator[tuple[int, list[str]]]:
    """Yield `(line_number, fields)` for each record of a delimited text file, header included.

    `quoting=True` follows CSV quoting (RecBole and pandas read atomic files this way, and
    Amazon titles span lines inside quotes); `quoting=False` splits on `delimiter` as a
    plain string (MovieLens `::`). Lines that do not decode are rejected through `bad`.
    Blank lines hold no row and are skipped.
    """
    path = Path(path)
    bad_lines: set[int] = set()

    def reject(line, reason, detail, rows=1):
        bad.counts.rows_read += rows  # rows that never reach the caller are still rows read
        bad.reject(path, line, reason, detail, rows)

    def decoded(fh) -> Iterator[str]:
        bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"read {path.name}",
                   disable=not progress, leave=False, mininterval=0.5)
        pending = 0
        for number, raw in enumerate(fh, 1):
            pending += len(raw)
            if pending > 1 << 20:
                bar.update(pending)
                pending = 0
            try:
                yield raw.decode(encoding)
            except UnicodeDecodeError as e:
                bad_lines.add(number)
                yield raw.decode(encoding, "replace")
        bar.update(pending)
        bar.close()

    with open(path, "rb") as fh:
        if quoting:
            reader = csv.reader(decoded(fh), delimiter=delimiter, quotechar='"')
            last = 0
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    reject(reader.line_num, "unparsable_row", f"cannot parse the row ({e})")
                    last = reader.line_num
                    continue
                first, last = last + 1, reader.line_num
                span = range(first, last + 1)
                if not fields:
                    continue
                if bad_lines and any(n in bad_lines for n in span):
                    reject(first, "bad_encoding", f"the line is not valid {encoding}")
                    continue
                if last - first >= MAX_RECORD_LINES:
                    reject(first, "unterminated_quote",
                           f"a quoted field opened on this line is not closed before line {last}",
                           rows=last - first + 1)
                    continue
                yield first, fields
        else:
            for number, line in enumerate(decoded(fh), 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                if number in bad_lines:
                    reject(number, "bad_encoding", f"the line is not valid {encoding}")
                    continue
                yield number, line.split(delimiter)


def parse_float(text: str) -> float:
    """A finite float, or ValueError (NaN and infinities are not timestamps or ratings)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value
