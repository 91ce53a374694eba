"""Reading delimited text row by row, with every bad row named, counted and never lost.

A malformed row either stops the run with `file:line: what was expected` (the default,
`on_bad_rows=error`) or, with `on_bad_rows=skip`, is dropped and counted by reason in the
manifest. pandas.read_csv cannot do this: with `on_bad_lines` it reports column-count
errors only, not bad numbers or bad encoding, and loses the line numbers after parsing.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import lzma
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from distrec.formats import DataError

MAX_EXAMPLES = 20  # first bad rows quoted in the manifest, enough to find a pattern
MAX_RECORD_LINES = 16  # a quoted field spanning more lines is an unterminated quote




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
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:  # an input that cannot be read is the input's problem, not a full disk
        raise DataError(f"{path}: cannot read the input ({e.strerror or e})") from None
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


# first bytes of the compressed files read transparently, and of those named instead
COMPRESSED = {b"\x1f\x8b\x08": "gzip", b"\xfd7zXZ\x00": "xz"}
OPENERS = {"gzip": lambda fh: gzip.GzipFile(fileobj=fh, mode="rb"), "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}
UNSUPPORTED = {b"PK\x03\x04": "a zip archive: unzip it and pass the file inside",
               b"\x28\xb5\x2f\xfd": "zstd-compressed: decompress it (zstd -d) or recompress it with gzip",
               b"7z\xbc\xaf\x27\x1c": "a 7z archive: extract it and pass the file inside"}


def compression(path: str | Path) -> str | None:
    """'gzip', 'bzip2' or 'xz' when the file's first bytes say so (whatever its name), else None.
    A zip/zstd/7z file is a DataError naming what to do."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise DataError(f"{path}: cannot read the input ({e.strerror or e})") from None
    for magic, name in COMPRESSED.items():
        if head.startswith(magic):
            return name
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "bzip2"
    for magic, what in UNSUPPORTED.items():
        if head.startswith(magic):
            raise DataError(f"{path}: is {what}")
    return None


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


class Records:
    """Iterate `(line_number, fields)` over the records of a delimited text file, header included.

    `quoting=True` follows CSV quoting (RecBole and pandas read atomic files this way, and
    Amazon titles span lines inside quotes); `quoting=False` splits on `delimiter` as a plain
    string (MovieLens `::`). Set `header` (the column names) once the header is read: from
    then on a record with another number of fields is rejected, with every line it spans
    counted. Lines that do not decode are rejected; a bad header line is an error whatever
    the policy. A UTF-8 byte-order mark is dropped. Blank lines hold no row and are skipped.
    """

    def __init__(self, path: str | Path, *, delimiter: str, encoding: str, bad: BadRows,
                 quoting: bool = True, progress: bool = False):
        self.path, self.delimiter, self.encoding = Path(path), delimiter, encoding
        self.bad, self.quoting, self.progress = bad, quoting, progress
        self.header: list[str] | None = None
        self._bad_lines: dict[int, tuple[int, int]] = {}  # line -> (first bad byte, its column)

    def _reject(self, line: int, reason: str, detail: str, rows: int = 1) -> None:
        if self.header is None and line <= 1:
            raise DataError(f"{self.path}:{line}: {detail} (the header line must be readable)")
        self.bad.counts.rows_read += rows  # rows that never reach the caller are still rows read
        self.bad.reject(self.path, line, reason, detail, rows)

    def _lines(self, fh, kind: str | None) -> Iterator[bytes]:
        """The file's lines as bytes; a compressed stream that breaks off is named, not an OSError."""
        number = 0
        try:
            for number, raw in enumerate(fh, 1):
                yield raw
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            if kind is None:
                raise
            raise DataError(f"{self.path}:{number + 1}: the {kind} stream is truncated or corrupt ({e}); "
                            "compress the file again or restore it") from None

    def _decoded(self, fh, raw_fh, kind: str | None) -> Iterator[str]:
        bar = tqdm(total=self.path.stat().st_size, unit="B", unit_scale=True, desc=f"read {self.path.name}",
                   disable=not self.progress, leave=False, mininterval=0.5)
        done = 0
        for number, raw in enumerate(self._lines(fh, kind), 1):
            if number % 4096 == 0:
                position = raw_fh.tell()  # bytes of the file on disk, compressed or not
                if position - done > 1 << 20:
                    bar.update(position - done)
                    done = position
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode(self.encoding)
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode(self.encoding, "replace")) + 1
                self._bad_lines[number] = (raw[e.start], column)
                yield raw.decode(self.encoding, "replace")
        bar.update(max(raw_fh.tell() - done, 0))
        bar.close()

    def _encoding_problem(self, first: int, last: int) -> str | None:
        """What is wrong with the bytes of lines first..last, and the setting that reads them."""
        bad = next((n for n in range(first, last + 1) if n in self._bad_lines), None)
        if bad is None:
            return None
        byte, column = self._bad_lines[bad]
        where = f"column {column}" if bad == first else f"line {bad}, column {column}"
        if _is_utf8(self.encoding):
            return (f"not UTF-8 (byte 0x{byte:02x} at {where}); if the file is Latin-1, set encoding=latin-1 "
                    "(or encoding=cp1252 for Windows files)")
        return f"not valid {self.encoding} (byte 0x{byte:02x} at {where}); set encoding= to the file's encoding"

    def _raw_records(self, lines: Iterator[str]) -> Iterator[tuple[int, int, list[str]]]:
        """(first line, last line, fields) of each non-blank record."""
        if not self.quoting:
            for number, line in enumerate(lines, 1):
                line = line.rstrip("\r\n")
                if line:
                    yield number, number, line.split(self.delimiter)
            return
        reader = csv.reader(lines, delimiter=self.delimiter, quotechar='"')
        last = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                self._reject(reader.line_num, "unparsable_row", f"cannot parse the row ({e})",
                             rows=reader.line_num - last)
                last = reader.line_num
                continue
            first, last = last + 1, reader.line_num
            if fields:
                yield first, last, fields

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        kind = compression(self.path)
        with open(self.path, "rb") as raw_fh:
            fh = OPENERS[kind](raw_fh) if kind else raw_fh
            for first, last, fields in self._raw_records(self._decoded(fh, raw_fh, kind)):
                span = last - first + 1
                problem = self._encoding_problem(first, last) if self._bad_lines else None
                if problem is not None:
                    self._reject(first, "bad_encoding", problem, rows=span)
                elif span > MAX_RECORD_LINES:
                    self._reject(first, "unterminated_quote",
                                 f"a quoted field opened on this line is not closed before line {last}", rows=span)
                elif self.header is not None and len(fields) != len(self.header):
                    where = f" (a quoted field runs from line {first} to {last})" if span > 1 else ""
                    self._reject(first, "wrong_column_count", f"expected {len(self.header)} columns "
                                 f"({', '.join(self.header)}), found {len(fields)}{where}", rows=span)
                else:
                    yield first, fields
