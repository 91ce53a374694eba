"""The common shape every reader produces: validated interaction rows and catalog rows.

Readers differ in layout; they all hand their fields to `InteractionRows.add` and
`ItemRows.add`, so validation (empty ids, bad numbers, duplicates) and the item text the
model will read are defined once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from distrec.data.records import BadRows, RowCounts

_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def parse_categories(value, separator: str = "auto") -> list[str]:
    """Split a categories value into a de-duplicated list, order kept.

    'auto' understands a quoted list (`'Beauty', 'Makeup'`, the Amazon RecBole files),
    then `|` (MovieLens .dat), then whitespace (RecBole `token_seq`, ML-1M genres).
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = [str(v).strip() for v in value]
    else:
        text = str(value).strip()
        if not text:
            return []
        if separator != "auto":
            parts = text.split(separator)
        elif text[0] in "'\"[":
            parts = [a or b for a, b in _QUOTED.findall(text)] or [text.strip("[]'\" ")]
        elif "|" in text:
            parts = text.split("|")
        else:
            parts = text.split()
    return list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))


def parse_time(text) -> float:
    """Seconds since the epoch from a number or an ISO 8601 date; ValueError otherwise."""
    return parse_time_kind(text)[0]


def parse_time_kind(text) -> tuple[float, bool]:
    """(`parse_time(text)`, whether the value was a number rather than a date)."""
    numeric = True
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        text = str(text).strip()
        try:
            value = float(text)
        except ValueError:
            numeric = False
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            value = moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value, numeric


EPOCH_START = datetime(1990, 1, 1, tzinfo=timezone.utc).timestamp()
EPOCH_UNITS = (("seconds", 1.0), ("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))
SHOWN = 2  # examples quoted in a warning


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def timestamp_warnings(frame: pd.DataFrame, path: str, now: float | None = None) -> list[str]:
    """Warnings about numeric epoch times: units mixed (seconds and milliseconds: the time
    order across them is wrong) or values before 1990 / after a year from now (placeholders
    such as 0, or a wrong unit). A column that is not epoch times (positions 1, 2, 3 ...:
    fewer than half the values plausible in any unit) is an order only and is not judged."""
    if "numeric_time" not in frame or not len(frame):
        return []
    numeric = frame["numeric_time"].to_numpy(dtype=bool)
    times, lines = frame["timestamp"].to_numpy()[numeric], frame["line"].to_numpy()[numeric]
    if not len(times):
        return []
    end = (now if now is not None else datetime.now(timezone.utc).timestamp()) + 365 * 86400
    unit = np.full(len(times), -1)
    for code, (_, scale) in enumerate(EPOCH_UNITS):
        unit[(unit < 0) & (times >= EPOCH_START * scale) & (times <= end * scale)] = code
    if (unit >= 0).mean() < 0.5:
        return []
    where = lambda mask: ", ".join(f"line {line}: {_number(t)}"  # noqa: E731
                                   for t, line in zip(times[mask][:SHOWN], lines[mask][:SHOWN]))
    warnings = []
    counts = np.bincount(unit[unit >= 0], minlength=len(EPOCH_UNITS))
    used = [code for code in np.argsort(-counts, kind="stable") if counts[code]]
    main = int(used[0])
    if len(used) > 1:
        parts = [f"{counts[c]:,} {'look like' if n == 0 else 'like'} {EPOCH_UNITS[c][0]} (e.g. {where(unit == c)})"
                 for n, c in enumerate(used)]
        warnings.append(f"{path}: timestamps mix units: {'; '.join(parts)}; their time order is wrong across units: "
                        "convert the column to one unit")
    absurd = unit < 0
    if absurd.any():
        first, last = datetime.fromtimestamp(EPOCH_START, timezone.utc), datetime.fromtimestamp(end, timezone.utc)
        warnings.append(f"{path}: {int(absurd.sum()):,} timestamps are before {first:%Y-%m-%d} or after "
                        f"{last:%Y-%m-%d} "
                        f"read as {EPOCH_UNITS[main][0]} since 1970 (e.g. {where(absurd)}): placeholders or a "
                        "wrong unit? They still order those interactions; fix or drop them")
    return warnings


def id_text(value) -> str:
    """An id as text: 12 and 12.0 both become '12' (Parquet/JSON give numbers). Anything that
    cannot be an id (None, NaN, lists, objects, text with tabs or line breaks) becomes ''."""
    if value is None or isinstance(value, (dict, list, tuple, bool)):
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    return "" if any(c in text for c in "\t\n\r") else text


class InteractionRows:
    """Collects validated interactions in file order."""

    def __init__(self, bad: BadRows):
        self.bad = bad
        self.user: list[str] = []
        self.item: list[str] = []
        self.timestamp: list[float] = []
        self.rating: list[float] = []
        self.event: list[str | None] = []
        self.weight: list[float] = []
        self.line: list[int] = []  # for messages about rows rejected after reading
        self.numeric_time: list[bool] = []  # the time was a number (epoch), not a date
        self.path: str = ""

    def add(self, path, line, user, item, timestamp=None, rating=None, event=None, weight=None) -> None:
        self.bad.counts.rows_read += 1
        user, item = id_text(user), id_text(item)
        if not user or not item:
            which = "user" if not user else "item"
            self.bad.reject(path, line, f"bad_{which}_id",
                            f"empty or invalid {which} id (expected a non-empty {which} id on one line)")
            return
        try:
            ts, numeric = (math.nan, False) if timestamp is None else parse_time_kind(timestamp)
        except (ValueError, TypeError, OverflowError):
            self.bad.reject(path, line, "bad_timestamp", f"timestamp {timestamp!r} is not a number or ISO date")
            return
        numbers = [ts]
        for name, raw in (("rating", rating), ("weight", weight)):
            try:
                value = math.nan if raw is None else float(raw)
                if raw is not None and not math.isfinite(value):
                    raise ValueError
            except (ValueError, TypeError, OverflowError):
                self.bad.reject(path, line, f"bad_{name}", f"{name} {raw!r} is not a finite number")
                return
            numbers.append(value)
        self.user.append(user)
        self.item.append(item)
        self.timestamp.append(numbers[0])
        self.rating.append(numbers[1])
        self.weight.append(numbers[2])
        self.event.append(None if event is None else str(event))
        self.line.append(line)
        self.numeric_time.append(numeric)
        self.path = str(path)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "user": pd.Series(self.user, dtype=object),
            "item": pd.Series(self.item, dtype=object),
            "timestamp": np.asarray(self.timestamp, dtype=np.float64),
            "rating": np.asarray(self.rating, dtype=np.float64),
            "event": pd.Series(self.event, dtype=object),
            "weight": np.asarray(self.weight, dtype=np.float64),
            "line": np.asarray(self.line, dtype=np.int64),
            "numeric_time": np.asarray(self.numeric_time, dtype=bool),
        })


def item_text(title: str, extras: dict[str, str], categories: list[str]) -> str:
    """The text the model reads for an item: title, labelled extra fields, categories."""
    parts = [title] if title else []
    parts += [f"{name.replace('_', ' ').title()}: {value}" for name, value in extras.items() if value]
    if categories:
        parts.append("Categories: " + ", ".join(categories))
    return ". ".join(parts)


class ItemRows:
    """Collects validated catalog rows; the first row of a duplicated id wins."""

    def __init__(self, bad: BadRows, separator: str = "auto"):
        self.bad = bad
        self.separator = separator
        self.seen: set[str] = set()
        self.rows: dict[str, list] = {"item": [], "title": [], "text": [], "categories": []}

    def add(self, path, line, item, title, extras: dict, categories) -> None:
        self.bad.counts.rows_read += 1
        item = id_text(item)
        if not item:
            self.bad.reject(path, line, "bad_item_id",
                            "empty or invalid item id (expected a non-empty item id on one line)")
            return
        if item in self.seen:
            self.bad.reject(path, line, "duplicate_item", f"item id {item!r} already defined earlier in the catalog")
            return
        self.seen.add(item)
        title = " ".join(str(title or "").split())  # titles with tabs/newlines become one line
        extras = {k: " ".join(str(v).split()) for k, v in extras.items() if v is not None}
        cats = parse_categories(categories, self.separator)
        self.rows["item"].append(item)
        self.rows["title"].append(title)
        self.rows["text"].append(item_text(title, extras, cats))
        self.rows["categories"].append(cats)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


@dataclass
class SourceData:
    """What a reader hands to processing."""

    interactions: pd.DataFrame  # user, item, timestamp, rating, event, weight; file order
    items: pd.DataFrame | None  # item, title, text, categories; None when there is no catalog
    interaction_counts: RowCounts
    item_counts: RowCounts
    files: list[dict] = field(default_factory=list)
    ordered_by: str = "timestamp"  # or "file order" when the source has no times
    interaction_path: str = ""  # named in messages about rows rejected after reading
    notes: dict = field(default_factory=dict)


def pick_column(header: list[str], wanted: str | None, conventions: tuple[str, ...], path: Path,
                role: str, key: str, required: bool = True) -> int | None:
    """Index of the column for `role`: the configured name, else the first conventional one."""
    if wanted is not None:
        if wanted not in header:
            raise_missing(path, header, f"column '{wanted}' (set by columns.{key})", key)
        return header.index(wanted)
    for name in conventions:
        if name in header:
            return header.index(name)
    if required:
        raise_missing(path, header, f"a {role} column (one of {', '.join(conventions)})", key)
    return None


def raise_missing(path, header, what, key):
    from distrec.formats import DataError

    raise DataError(f"{path}: expected {what}; the header has: {', '.join(header)}.\n"
                    f"  (name the right column with columns.{key}=NAME)")
