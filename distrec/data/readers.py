"""Readers of real interaction logs: RecBole atomic files, MovieLens, P5 sequences, tables.

Each `read_<source>(cfg)` returns a `SourceData` in file order; nothing is filtered here
beyond malformed rows (which `BadRows` rejects or counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from distrec.data.config import PrepareConfig
from distrec.data.records import BadRows, DataError, Records, RowCounts, compression, file_info, require_file
from distrec.data.source import InteractionRows, ItemRows, SourceData, pick_column

RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_NAMES = ("title", "movie_title", "name", "item_name", "product_title")
CATEGORY_NAMES = ("categories", "category", "genre", "genres", "class")
EXTRA_TEXT_NAMES = ("brand", "release_year", "year", "artist", "author")
USER_NAMES = ("user_id", "user", "userId", "customer_id", "visitorid")
ITEM_NAMES = ("item_id", "item", "itemId", "movieId", "product_id", "itemid")
TIME_NAMES = ("timestamp", "time", "ts", "event_time", "datetime", "date")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


class _Context:
    """Per-run helpers shared by the readers: policies, counters, the files read."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.inter_counts, self.item_counts = RowCounts(), RowCounts()
        self.interactions = InteractionRows(BadRows(cfg.on_bad_rows, self.inter_counts))
        self.items = ItemRows(BadRows(cfg.on_bad_rows, self.item_counts), cfg.columns.category_separator)
        self.files: list[dict] = []

    def records(self, path: Path, delimiter: str, encoding: str, what: str, quoting=True, counts=None,
                header=None) -> Records:
        self.files.append(file_info(require_file(path, what)))
        bad = BadRows(self.cfg.on_bad_rows, counts or self.inter_counts)
        records = Records(path, delimiter=delimiter, encoding=encoding, bad=bad, quoting=quoting,
                          progress=self.cfg.progress)
        records.header = header
        return records

    def result(self, ordered_by="timestamp", with_items=True) -> SourceData:
        if self.inter_counts.rows_read == 0:
            raise DataError(f"{self.files[0]['path'] if self.files else self.cfg.input}: no interaction rows "
                            "(the file holds at most a header)")
        return SourceData(self.interactions.frame(), self.items.frame() if with_items else None,
                          self.inter_counts, self.item_counts, self.files, ordered_by,
                          interaction_path=self.interactions.path)


# --- RecBole atomic files -------------------------------------------------------------

def _recbole_header(path: Path, fields: list[str]) -> list[str]:
    names = []
    for position, spec in enumerate(fields, 1):
        name, _, kind = spec.strip().partition(":")
        if not name or kind not in RECBOLE_TYPES:
            raise DataError(f"{path}:1: header column {position} is {spec!r}; expected name:type with "
                            f"type one of {', '.join(RECBOLE_TYPES)}")
        if name in names:
            raise DataError(f"{path}:1: header names column {name!r} twice")
        names.append(name)
    return names


def _read_recbole_items(ctx: _Context, path: Path, encoding: str) -> None:
    cols = ctx.cfg.columns
    records = ctx.records(path, "\t", encoding, "RecBole item file", counts=ctx.item_counts)
    header = None
    for line, fields in records:
        if header is None:
            header = records.header = _recbole_header(path, fields)
            i_id = pick_column(header, cols.item_id, ("item_id",), path, "item id", "item_id")
            i_title = pick_column(header, cols.title, TITLE_NAMES, path, "title", "title", required=False)
            i_cat = pick_column(header, cols.categories, CATEGORY_NAMES, path, "categories", "categories", required=False)
            extra = cols.text if cols.text is not None else [n for n in EXTRA_TEXT_NAMES if n in header]
            for name in extra:
                pick_column(header, name, (), path, "text", "text")
            i_extra = {name: header.index(name) for name in extra}
            continue
        ctx.items.add(path, line, fields[i_id], fields[i_title] if i_title is not None else "",
                      {n: fields[i] for n, i in i_extra.items()}, fields[i_cat] if i_cat is not None else None)
    if header is None:
        raise DataError(f"{path}: no header line (expected name:type columns)")


def read_recbole(cfg: PrepareConfig) -> SourceData:
    ctx, cols = _Context(cfg), cfg.columns
    encoding = cfg.encoding or "utf-8"
    root = Path(cfg.input)
    if root.is_dir():
        inters = sorted(root.glob("*.inter"))
        if len(inters) != 1:
            raise DataError(f"{root}: expected exactly one .inter file in the directory, found {len(inters)}")
        inter_path = inters[0]
    else:
        inter_path = root
    header = None
    records = ctx.records(inter_path, "\t", encoding, "RecBole interaction file")
    for line, fields in records:
        if header is None:
            header = records.header = _recbole_header(inter_path, fields)
            i_user = pick_column(header, cols.user, ("user_id",), inter_path, "user id", "user")
            i_item = pick_column(header, cols.item, ("item_id",), inter_path, "item id", "item")
            i_time = pick_column(header, cols.timestamp, ("timestamp",), inter_path, "time", "timestamp", False)
            i_rating = pick_column(header, cols.rating, ("rating",), inter_path, "rating", "rating", False)
            i_event = pick_column(header, cols.event, (), inter_path, "event", "event", False)
            i_weight = pick_column(header, cols.weight, (), inter_path, "weight", "weight", False)
            continue
        get = lambda i: None if i is None else fields[i]  # noqa: E731
        ctx.interactions.add(inter_path, line, fields[i_user], fields[i_item], get(i_time),
                             get(i_rating), get(i_event), get(i_weight))
    if header is None:
        raise DataError(f"{inter_path}: no header line (expected name:type columns)")
    item_path = Path(cfg.items) if cfg.items else inter_path.with_suffix(".item")
    if cfg.items or item_path.exists():
        _read_recbole_items(ctx, item_path, encoding)
    ordered = "timestamp" if i_time is not None else "file order"
    return ctx.result(ordered, with_items=bool(cfg.items or item_path.exists()))


# --- MovieLens (GroupLens layouts) ----------------------------------------------------

def read_movielens(cfg: PrepareConfig) -> SourceData:
    """ML-1M/10M `ratings.dat` + `movies.dat` (`::`), or ML-100K `u.data` + `u.item` (`|`)."""
    ctx = _Context(cfg)
    root = Path(cfg.input)
    folder = root if root.is_dir() else root.parent
    encoding = cfg.encoding or "latin-1"  # GroupLens files predate UTF-8 (e.g. "Misérables")
    if (folder / "ratings.dat").exists() or root.name == "ratings.dat":
        ratings, sep = folder / "ratings.dat", "::"
        movies = Path(cfg.items) if cfg.items else folder / "movies.dat"
    elif (folder / "u.data").exists() or root.name == "u.data":
        ratings, sep = folder / "u.data", "\t"
        movies = Path(cfg.items) if cfg.items else folder / "u.item"
    else:
        raise DataError(f"{root}: no MovieLens ratings found (expected ratings.dat or u.data)")
    header = ["user", "item", "rating", "timestamp"]
    for line, fields in ctx.records(ratings, sep, encoding, "MovieLens ratings", quoting=False, header=header):
        ctx.interactions.add(ratings, line, fields[0], fields[1], fields[3], fields[2])
    if movies.name == "u.item":
        genres = list(ML100K_GENRES)
        if (folder / "u.genre").exists():
            genres = [f[0] for _, f in ctx.records(folder / "u.genre", "|", encoding, "u.genre", False, ctx.item_counts)
                      if f and f[0]]
            ctx.item_counts.rows_read = 0
        header = ["movie id", "title", "release date", "video release date", "IMDb URL"] + genres
        for line, fields in ctx.records(movies, "|", encoding, "MovieLens u.item", False, ctx.item_counts, header):
            cats = [g for g, flag in zip(genres, fields[5:]) if flag.strip() == "1"]
            ctx.items.add(movies, line, fields[0], fields[1], {}, cats)
    else:
        header = ["movie id", "title", "genres"]
        for line, fields in ctx.records(movies, "::", encoding, "MovieLens movies.dat", False, ctx.item_counts, header):
            ctx.items.add(movies, line, fields[0], fields[1], {}, fields[2].split("|"))
    return ctx.result()


# --- P5 / S3-Rec sequential format ----------------------------------------------------

def read_p5(cfg: PrepareConfig) -> SourceData:
    """`sequential_data.txt` (`user item item ...`, time order) + `datamaps.json` + `.item` text."""
    ctx = _Context(cfg)
    root = Path(cfg.input)
    folder = root if root.is_dir() else root.parent
    seq_path = root if root.is_file() else folder / "sequential_data.txt"
    maps_path = require_file(folder / "datamaps.json", "P5 datamaps.json")
    ctx.files.append(file_info(maps_path))
    try:
        maps = json.loads(maps_path.read_text(encoding="utf-8"))
        id2user = {str(v): k for k, v in maps["user2id"].items()}
        id2item = {str(v): k for k, v in maps["item2id"].items()}
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise DataError(f"{maps_path}: expected JSON with 'user2id' and 'item2id' mappings ({e})") from None
    bad = ctx.interactions.bad
    for line, fields in ctx.records(seq_path, " ", cfg.encoding or "utf-8", "P5 sequential_data.txt", quoting=False):
        fields = [f for f in fields if f]
        if len(fields) < 2:
            ctx.inter_counts.rows_read += 1
            bad.reject(seq_path, line, "wrong_column_count", "expected 'user item [item ...]', found no items")
            continue
        user = id2user.get(fields[0])
        unknown = [f for f in fields[1:] if f not in id2item]
        if user is None or unknown:
            ctx.inter_counts.rows_read += len(fields) - 1
            what = f"user index {fields[0]!r}" if user is None else f"item index {unknown[0]!r}"
            bad.reject(seq_path, line, "unknown_index", f"{what} is not in {maps_path.name}", rows=len(fields) - 1)
            continue
        for item in fields[1:]:
            ctx.interactions.add(seq_path, line, user, id2item[item])
    if cfg.items:
        item_path = Path(cfg.items)
    else:
        candidates = sorted(folder.glob("*.item"))
        if len(candidates) != 1:
            raise DataError(f"{folder}: expected one .item file with the item text, found {len(candidates)}; "
                            "pass --items PATH")
        item_path = candidates[0]
    _read_recbole_items(ctx, item_path, cfg.encoding or "utf-8")
    return ctx.result("file order")


# --- Tables: CSV / TSV / Parquet / JSONL ----------------------------------------------

COMPRESSED_SUFFIXES = (".gz", ".gzip", ".bz2", ".xz")
SEPARATORS = (";", "\t", "|", ",")  # what a one-column header may really be split by


def _table_format(ctx: _Context, path: Path) -> str:
    kind = ctx.cfg.columns.format
    if kind == "auto":
        suffixes = [s.lower() for s in path.suffixes]
        while suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:  # log.csv.gz: a compressed csv
            suffixes.pop()
        kind = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet", ".pq": "parquet",
                ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(suffixes[-1] if suffixes else "")
        if kind is None:
            raise DataError(f"{path}: cannot tell the format from the extension; set columns.format=csv|tsv|parquet|jsonl")
    return kind


def _table_rows(ctx: _Context, path: Path, counts: RowCounts):
    """Yield (line or row number, row as a dict) for each row of a CSV/TSV/Parquet/JSONL file.
    A value missing from a row is None (and rejected downstream when its column is used)."""
    kind = _table_format(ctx, path)
    encoding = ctx.cfg.encoding or "utf-8"
    if kind == "parquet":
        ctx.files.append(file_info(require_file(path, "table")))
        packed = compression(path)
        if packed:
            raise DataError(f"{path}: is {packed}-compressed; Parquet compresses inside the file already: "
                            "decompress it and pass the .parquet file")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        number = 0
        for batch in table.to_batches(65536):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    elif kind == "jsonl":
        bad = BadRows(ctx.cfg.on_bad_rows, counts)
        for line, fields in ctx.records(path, "\n", encoding, "table", quoting=False, counts=counts):
            try:
                row = json.loads(fields[0])
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                counts.rows_read += 1
                bad.reject(path, line, "bad_json", f"expected one JSON object per line ({e})")
                continue
            yield line, row
    else:
        separator = ctx.cfg.columns.separator or ("," if kind == "csv" else "\t")
        records = ctx.records(path, separator, encoding, "table", counts=counts)
        for line, fields in records:
            if records.header is None:
                records.header = [f.strip() for f in fields]
                if len(records.header) == 1:
                    _separator_hint(path, line, records.header[0], separator)
                if len(set(records.header)) != len(records.header):
                    raise DataError(f"{path}:{line}: the header names a column twice: {', '.join(records.header)}")
                continue
            yield line, dict(zip(records.header, fields))


def _separator_hint(path: Path, line: int, header: str, separator: str) -> None:
    """A table needs a user and an item column: a header read as one column that holds another
    separator is a file split by that separator."""
    for other in SEPARATORS:
        if other != separator and other in header:
            shown = "\\t" if other == "\t" else other
            raise DataError(f"{path}:{line}: the header is one column {header!r}; the file looks separated by "
                            f"{other!r}, not {separator!r}: set the separator, e.g. columns.separator='{shown}'")


def _columns(row: dict, path: Path, specs) -> list[str | None]:
    """Column names for each (configured name, conventional names, role, key, required)."""
    header = list(row)
    return [None if (i := pick_column(header, *spec[:2], path, *spec[2:])) is None else header[i] for spec in specs]


def read_table(cfg: PrepareConfig) -> SourceData:
    ctx, cols = _Context(cfg), cfg.columns
    path = Path(cfg.input)
    if path.is_dir():
        raise DataError(f"{path}: the table source reads one file; pass the interaction file as --input")
    names = None
    for line, row in _table_rows(ctx, path, ctx.inter_counts):
        if names is None:  # resolved from the first row (JSONL rows may omit keys: None below)
            names = _columns(row, path, [
                (cols.user, USER_NAMES, "user id", "user", True),
                (cols.item, ITEM_NAMES, "item id", "item", True),
                (cols.timestamp, TIME_NAMES, "time", "timestamp", False),
                (cols.rating, ("rating",), "rating", "rating", False),
                (cols.event, ("event", "event_type"), "event", "event", False),
                (cols.weight, ("weight",), "weight", "weight", False)])
        # a column the table has but this row lacks reads as "", which the checks reject
        ctx.interactions.add(path, line, *[None if n is None else _present(row.get(n)) for n in names])
    with_items = cfg.items is not None
    if with_items:
        item_path = Path(cfg.items)
        item_names = None
        for line, row in _table_rows(ctx, item_path, ctx.item_counts):
            if item_names is None:
                item_names = _columns(row, item_path, [
                    (cols.item_id, ITEM_NAMES, "item id", "item_id", True),
                    (cols.title, TITLE_NAMES, "title", "title", False),
                    (cols.categories, CATEGORY_NAMES, "categories", "categories", False)])
                for name in cols.text or []:
                    pick_column(list(row), name, (), item_path, "text", "text")
            i_id, i_title, i_cat = item_names
            ctx.items.add(item_path, line, _present(row.get(i_id)), row.get(i_title) if i_title else "",
                          {n: row.get(n) for n in cols.text or []}, row.get(i_cat) if i_cat else None)
    has_time = names is not None and names[2] is not None
    return ctx.result("timestamp" if has_time else "file order", with_items=with_items)


def _present(value):
    return "" if value is None else value
