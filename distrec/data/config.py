"""The config of `distrec prepare`: where the logs come from and how they become a dataset.

Every key is documented on its own line (`distrec prepare --help-config` prints them).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Literal, Optional

from distrec.config import doc

SOURCES = ("recbole", "movielens", "p5", "table", "synthetic")



@dataclass
class ColumnsConfig:
    """Which input columns mean what. `null` = the source's convention (auto-detected)."""

    user: Optional[str] = doc("interaction column holding the user id", default=None)
    item: Optional[str] = doc("interaction column holding the item id", default=None)
    timestamp: Optional[str] = doc("interaction column holding the time (number or ISO date)", default=None)
    rating: Optional[str] = doc("interaction column holding an explicit rating", default=None)
    event: Optional[str] = doc("interaction column holding the event type (view, cart, buy...)", default=None)
    weight: Optional[str] = doc("interaction column holding a sample weight", default=None)
    item_id: Optional[str] = doc("catalog column holding the item id", default=None)
    title: Optional[str] = doc("catalog column holding the item title", default=None)
    text: Optional[list[str]] = doc("further catalog columns joined into the item text (brand, year...)", default=None)
    categories: Optional[str] = doc("catalog column holding the item's categories", default=None)
    category_separator: str = doc(
        "how a categories value splits: 'auto' (a quoted list like 'a', 'b'; else '|'; else whitespace) "
        "or a literal separator", default="auto")
    format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = doc(
        "file format of the table source (auto = from the extension; .gz/.bz2/.xz files are read "
        "decompressed)", default="auto")
    separator: Optional[str] = doc(
        "field separator of a csv/tsv table: one character, or '\\t' for a tab (null = ',' for csv, "
        "tab for tsv)", default=None)

    def __post_init__(self):
        if self.separator in ("\\t", "tab"):  # `columns.separator=\t` on a command line
            self.separator = "\t"
        if self.separator is not None and (len(self.separator) != 1 or self.separator in "\"\r\n"):
            raise ValueError(f"columns.separator must be one character other than a quote or a line break "
                             f"(or '\\t' for a tab), got {self.separator!r}")


@dataclass
class FilterConfig:
    min_rating: Optional[float] = doc("keep interactions with rating >= this (null keeps all)", default=None)
    events: Optional[list[str]] = doc("keep only these event types (null keeps all)", default=None)
    dedupe: Literal["none", "exact", "first"] = doc(
        "'exact' drops rows repeating (user, item, timestamp); 'first' keeps only a user's first "
        "interaction with an item; 'none' keeps repeats", default="exact")
    min_user_interactions: int = doc("k-core: drop users with fewer interactions", default=0)
    min_item_interactions: int = doc("k-core: drop items with fewer interactions", default=0)
    kcore: Literal["iterative", "once"] = doc(
        "'iterative' repeats the user/item filters until both hold; 'once' applies items then users once",
        default="iterative")
    keep_unseen_items: bool = doc(
        "keep catalog items that no interaction mentions (rankable cold items)", default=False)

    def __post_init__(self):
        if self.min_user_interactions < 0 or self.min_item_interactions < 0:
            raise ValueError("min_user_interactions and min_item_interactions must be >= 0")


@dataclass
class SplitConfig:
    mode: Literal["loo", "time"] = doc(
        "'loo': per user, last interaction = test, second-last = validation; "
        "'time': global time cut-offs at the val/test fractions of interactions", default="loo")
    val_fraction: float = doc("time mode: share of the latest interactions before the test period used for validation", default=0.1)
    test_fraction: float = doc("time mode: share of the latest interactions used for test", default=0.1)
    cold_item_fraction: float = doc(
        "share of items held out of training and validation entirely (their interactions only "
        "appear as test targets)", default=0.0)
    seed: int = doc("seed of the cold-item draw", default=0)

    def __post_init__(self):
        for name in ("val_fraction", "test_fraction", "cold_item_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"split.{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("split.val_fraction + split.test_fraction must be < 1")
        if self.mode == "time" and self.test_fraction <= 0.0:
            raise ValueError("split.test_fraction must be > 0 with split.mode=time")
        if self.seed < 0:
            raise ValueError("split.seed must be >= 0")


@dataclass
class ShardsConfig:
    samples: Literal["user", "prefix"] = doc(
        "'user': one training sample per user (history + last training item as target); "
        "'prefix': one sample per position of every user's training sequence", default="user")
    max_history: int = doc("keep at most this many most recent history items per sample (0 = all)", default=200)
    samples_per_shard: int = doc("samples in each WebDataset tar", default=10000)
    seed: int = doc("seed of the sample shuffle before sharding", default=0)

    def __post_init__(self):
        if self.samples_per_shard < 1:
            raise ValueError("shards.samples_per_shard must be >= 1")
        if self.max_history < 0 or self.seed < 0:
            raise ValueError("shards.max_history and shards.seed must be >= 0")


@dataclass
class SyntheticConfig:
    num_users: int = doc("users to generate", default=2000)
    num_items: int = doc("catalog size, new items included", default=1000)
    num_categories: int = doc("item categories; each has its own title vocabulary", default=16)
    mean_length: float = doc("mean interactions per user (minimum 5)", default=20.0)
    new_item_fraction: float = doc(
        "share of items released last: they only ever occur as a user's final interaction, so "
        "under leave-one-out they never appear in training (cold start)", default=0.05)
    cold_target_share: float = doc(
        "chance that a user's final interaction is a new item (when its category has one)", default=0.2)
    stay_probability: float = doc("chance that the next item shares the last item's category", default=0.5)
    seed: int = doc("generator seed", default=0)

    def __post_init__(self):
        if self.num_users < 1 or self.num_items < 2 or self.num_categories < 1:
            raise ValueError("synthetic: num_users >= 1, num_items >= 2, num_categories >= 1 required")
        if self.num_categories > self.num_items:
            raise ValueError("synthetic: num_categories must be <= num_items")
        if self.seed < 0:
            raise ValueError("synthetic.seed must be >= 0")
        if not 0.0 <= self.new_item_fraction < 1.0:
            raise ValueError("synthetic.new_item_fraction must be in [0, 1)")
        if not (0.0 <= self.stay_probability <= 1.0 and 0.0 <= self.cold_target_share <= 1.0):
            raise ValueError("synthetic.stay_probability and synthetic.cold_target_share must be in [0, 1]")


@dataclass
class PrepareConfig:
    source: Literal["recbole", "movielens", "p5", "table", "synthetic"] = doc(
        "input format: recbole | movielens | p5 | table | synthetic", default="synthetic")
    input: Optional[str] = doc("interaction file or data-set directory (not used by synthetic)", default=None)
    items: Optional[str] = doc(
        "item catalog file (default: recbole NAME.item beside NAME.inter, movielens movies.dat or u.item, "
        "p5 the one *.item file in the folder; table: none, pass it)", default=None)
    out: Optional[str] = doc("output directory (written atomically)", default=None)
    overwrite: bool = doc("replace an existing output directory", default=False)
    encoding: Optional[str] = doc("text encoding of the input files (null = the source's convention)", default=None)
    on_bad_rows: Literal["error", "skip"] = doc(
        "'error' stops at the first malformed row naming file and line; 'skip' drops it and "
        "counts it in the manifest", default="error")
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    progress: bool = doc("show progress bars", default=True)

    def __post_init__(self):
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"encoding: unknown text encoding {self.encoding!r} (e.g. utf-8, latin-1)") from None
