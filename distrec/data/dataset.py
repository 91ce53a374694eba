"""From validated rows to a dataset: filters, id vocabularies, chronological splits.

Every step records how many interactions it kept, so the manifest explains each count
(`steps`). Splits follow PROTOCOL.md: leave-one-out per user in time order (ties keep
file order), or a global time split; cold items never reach training or validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from distrec.data.config import PrepareConfig
from distrec.data.records import BadRows, DataError
from distrec.data.source import SourceData, timestamp_warnings

NO_CATALOG = "no item catalog: every item text is empty, so text models cannot learn; pass --items FILE"


@dataclass
class Dataset:
    users: pd.DataFrame  # index, user_id
    items: pd.DataFrame  # index, item_id, title, text, categories, held_out, train_count
    train: list[np.ndarray]  # per user index: training item sequence, time order
    val: pd.DataFrame  # user, history, target
    test: pd.DataFrame  # user, history, target, cold_target
    num_interactions: int
    steps: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def _filter(frame: pd.DataFrame, source: SourceData, cfg: PrepareConfig, steps: dict) -> pd.DataFrame:
    f = cfg.filter
    if f.events is not None:
        if frame["event"].isna().all():
            raise DataError("filter.events is set but the interactions have no event column (set columns.event)")
        frame = frame[frame["event"].isin(f.events)]
        steps["after_event_filter"] = len(frame)
    if f.min_rating is not None:
        if frame["rating"].isna().all():
            raise DataError("filter.min_rating is set but the interactions have no rating column (set columns.rating)")
        frame = frame[frame["rating"] >= f.min_rating]
        steps["after_rating_filter"] = len(frame)
    if source.items is not None:
        unknown = ~frame["item"].isin(set(source.items["item"]))
        if unknown.any():
            first = frame[unknown].iloc[0]
            bad = BadRows(cfg.on_bad_rows, source.interaction_counts)
            if cfg.on_bad_rows == "error":
                bad.reject(source.interaction_path, int(first["line"]), "item_not_in_catalog",
                           f"item {first['item']!r} is not in the item catalog ({int(unknown.sum())} rows name unknown items)")
            for line, item in frame.loc[unknown, ["line", "item"]].itertuples(index=False):
                bad.reject(source.interaction_path, int(line), "item_not_in_catalog", f"item {item!r} is not in the item catalog")
            frame = frame[~unknown]
            steps["after_catalog_check"] = len(frame)
    if source.ordered_by == "timestamp":
        frame = frame.sort_values("timestamp", kind="stable")  # ties keep file order
    # without timestamps two equal (user, item) rows may be real repeats: 'exact' cannot tell
    if f.dedupe == "first" or (f.dedupe == "exact" and source.ordered_by == "timestamp"):
        keys = ["user", "item", "timestamp"] if f.dedupe == "exact" else ["user", "item"]
        frame = frame[~frame.duplicated(keys, keep="first")]
        steps["after_dedupe"] = len(frame)
    if f.min_user_interactions or f.min_item_interactions:
        while True:
            before = len(frame)
            if f.min_item_interactions:
                counts = frame["item"].map(frame["item"].value_counts())
                frame = frame[counts >= f.min_item_interactions]
            if f.min_user_interactions:
                counts = frame["user"].map(frame["user"].value_counts())
                frame = frame[counts >= f.min_user_interactions]
            if f.kcore == "once" or len(frame) == before:
                break
        steps["after_kcore"] = len(frame)
    if frame.empty:
        raise DataError("no interactions left after filtering; loosen the filter.* settings")
    return frame


def _catalog(frame: pd.DataFrame, source: SourceData, cfg: PrepareConfig) -> pd.DataFrame:
    """Items in index order: first appearance in the (time-ordered) log, then unseen catalog items."""
    order = pd.unique(frame["item"])
    if source.items is None:
        items = pd.DataFrame({"item": order, "title": "", "text": "", "categories": [[] for _ in order]})
    else:
        catalog = source.items.set_index("item", drop=False)
        seen = set(order)
        extra = [i for i in catalog.index if i not in seen] if cfg.filter.keep_unseen_items else []
        items = catalog.loc[list(order) + extra].reset_index(drop=True)
    items.insert(0, "index", np.arange(len(items), dtype=np.int32))
    return items.rename(columns={"item": "item_id"})


def _loo(seq: np.ndarray):
    """(train, val (history, target) | None, test (history, target) | None) of one user."""
    if len(seq) < 3:  # as SASRec: too short to hold out two items, all of it trains
        return seq, None, None
    return seq[:-2], (seq[:-2], seq[-2]), (seq[:-1], seq[-1])


def _time_split(seq: np.ndarray, times: np.ndarray, t_val: float, t_test: float):
    train = seq[times < t_val]
    val_part = np.flatnonzero((times >= t_val) & (times < t_test))
    test_part = np.flatnonzero(times >= t_test)
    val = (train, seq[val_part[0]]) if len(val_part) and len(train) else None
    test = None
    if len(test_part) and test_part[0] > 0:
        test = (seq[:test_part[0]], seq[test_part[0]])
    return train, val, test


def build(source: SourceData, cfg: PrepareConfig) -> Dataset:
    """The prepared dataset of `source`: filtered (counts recorded per step), ids mapped to
    vocabularies, split leave-one-out or by time as `cfg` says."""
    steps = {"read": len(source.interactions)}
    frame = _filter(source.interactions, source, cfg, steps)
    items = _catalog(frame, source, cfg)
    users = pd.DataFrame({"user_id": pd.unique(frame["user"])})
    users.insert(0, "index", np.arange(len(users), dtype=np.int32))
    user_idx = frame["user"].map(pd.Series(users["index"].values, index=users["user_id"])).to_numpy()
    item_idx = frame["item"].map(pd.Series(items["index"].values, index=items["item_id"])).to_numpy().astype(np.int32)
    times = frame["timestamp"].to_numpy()
    order = np.argsort(user_idx, kind="stable")  # per user, keeps time (or file) order
    bounds = np.cumsum(np.bincount(user_idx, minlength=len(users)))[:-1]
    sequences = np.split(item_idx[order], bounds)
    seq_times = np.split(times[order], bounds)

    held_out = np.zeros(len(items), dtype=bool)
    if cfg.split.cold_item_fraction > 0:
        seen = np.unique(item_idx)
        count = int(round(cfg.split.cold_item_fraction * len(seen)))
        held_out[np.random.default_rng(cfg.split.seed).choice(seen, size=count, replace=False)] = True

    if cfg.split.mode == "time":
        if source.ordered_by != "timestamp":
            raise DataError("split.mode=time needs timestamps and this source has none; use split.mode=loo")
        t_test = np.quantile(times, 1.0 - cfg.split.test_fraction)
        t_val = np.quantile(times, 1.0 - cfg.split.test_fraction - cfg.split.val_fraction)

    train, val_rows, test_rows, removed = [], [], [], 0
    for u, (seq, ts) in enumerate(zip(sequences, seq_times)):
        if held_out.any():  # cold items vanish from the log except as a final (test) target
            keep = ~held_out[seq]
            if cfg.split.mode == "loo" and len(seq):
                keep[-1] = True
            else:
                keep |= ts >= t_test if cfg.split.mode == "time" else False
            removed += int((~keep).sum())
            seq, ts = seq[keep], ts[keep]
        parts = _loo(seq) if cfg.split.mode == "loo" else _time_split(seq, ts, t_val, t_test)
        tr, val, test = parts
        if held_out.any():
            tr = tr[~held_out[tr]]
            if val is not None and held_out[val[1]]:
                val = None
            if test is not None:
                test = (test[0][~held_out[test[0]]], test[1])
        train.append(tr.astype(np.int32))
        if val is not None:
            val_rows.append((u, val[0].astype(np.int32), int(val[1])))
        if test is not None:
            test_rows.append((u, test[0].astype(np.int32), int(test[1])))
    if removed:
        steps["after_cold_holdout"] = int(len(frame) - removed)
    warnings = []
    if not any(len(s) >= 2 for s in train):
        warnings.append("no user has two training interactions: there are no training samples "
                        "(use more data, or shorter val/test periods with split.mode=time)")
    if not val_rows:
        warnings.append("the validation split is empty")
    if source.ordered_by == "timestamp":
        warnings += timestamp_warnings(source.interactions, source.interaction_path)
    if source.items is None:
        warnings.append(NO_CATALOG)
    elif len(items) and (items["text"] == "").all():
        warnings.append("every item text is empty: the catalog has no title, text or categories values "
                        "(name its columns with columns.title / columns.text / columns.categories), so text "
                        "models cannot learn")
    if not test_rows:
        raise DataError("the split leaves no test users (each needs a history and a later interaction); "
                        "check the timestamps or split.test_fraction")

    train_count = np.bincount(np.concatenate(train) if train else np.zeros(0, np.int32), minlength=len(items))
    items["held_out"] = held_out
    items["train_count"] = train_count.astype(np.int64)
    val = pd.DataFrame(val_rows, columns=["user", "history", "target"])
    test = pd.DataFrame(test_rows, columns=["user", "history", "target"])
    test["cold_target"] = train_count[test["target"].to_numpy()] == 0 if len(test) else np.zeros(0, bool)
    notes = {
        "items_without_title": int((items["title"] == "").sum()),
        "items_without_text": int((items["text"] == "").sum()),
        "users_without_test": int(len(users) - len(test)),
        "cold_test_targets": int(test["cold_target"].sum()),
    }
    if warnings:
        notes["warnings"] = warnings
    if source.items is None:
        notes["no_catalog"] = NO_CATALOG
    return Dataset(users, items, train, val, test, int(len(frame) - removed), steps, notes)
