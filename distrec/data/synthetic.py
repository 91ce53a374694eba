"""A seeded generator of interaction logs whose item text really predicts behaviour.

Each category owns a vocabulary of made-up words; an item's title is drawn mostly from its
category's words, so a text encoder can tell categories apart from titles alone. Users
prefer a few categories (sparse Dirichlet) and tend to stay in the category of their last
item, so both the user's mix and the sequence carry signal. A share of items is "new":
released last, they only ever occur as a user's final interaction, so under leave-one-out
they never appear in training and must be recommended from their text (cold start).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from distrec.data.config import SyntheticConfig
from distrec.data.records import BadRows, RowCounts
from distrec.data.source import ItemRows, SourceData

CATEGORY_NAMES = ("Books", "Garden", "Jazz", "Running", "Cooking", "Travel", "Comics", "Skincare",
                  "Camping", "Chess", "Pottery", "Cycling", "Opera", "Baking", "Fishing", "Yoga",
                  "Robotics", "Poetry", "Knitting", "Surfing", "Astronomy", "Painting", "Hiking", "Coffee")
_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "va", "po", "zen", "dor", "fi", "sha", "qu", "bel", "nox",
              "tri", "mar", "els", "vin", "gor", "lu")


def _category_names(count: int) -> list[str]:
    return [CATEGORY_NAMES[c % len(CATEGORY_NAMES)] + ("" if c < len(CATEGORY_NAMES) else f" {c // len(CATEGORY_NAMES) + 1}")
            for c in range(count)]


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))))
    return sorted(words)


def generate(cfg: SyntheticConfig) -> SourceData:
    rng = np.random.default_rng(cfg.seed)
    n_items, n_cats = cfg.num_items, cfg.num_categories
    names = _category_names(n_cats)
    words = _vocabulary(rng, 12 * n_cats + 40)
    vocab = [words[12 * c:12 * (c + 1)] for c in range(n_cats)]
    generic = words[12 * n_cats:]

    category = rng.permutation(np.arange(n_items) % n_cats)  # every category non-empty
    popularity = rng.pareto(1.2, size=n_items) + 1.0
    n_new = int(round(cfg.new_item_fraction * n_items))
    is_new = np.zeros(n_items, dtype=bool)
    is_new[rng.choice(n_items, size=n_new, replace=False)] = True

    items = ItemRows(BadRows("error", RowCounts()))
    for i in range(n_items):
        own = rng.choice(vocab[category[i]], size=rng.integers(2, 4), replace=False)
        title = " ".join([w.capitalize() for w in own] + [str(rng.choice(generic))])
        items.add("synthetic", i + 1, f"item_{i:06d}", title, {}, [names[category[i]]])

    members = [np.flatnonzero((category == c) & ~is_new) for c in range(n_cats)]
    fresh = [np.flatnonzero((category == c) & is_new) for c in range(n_cats)]
    weights = [popularity[m] / popularity[m].sum() if len(m) else m for m in members]
    users, item_ids, times = [], [], []
    for u in range(cfg.num_users):
        preference = rng.dirichlet(np.full(n_cats, 0.3))
        length = 5 + rng.poisson(max(cfg.mean_length - 5.0, 0.0))
        clock = rng.uniform(0, 1e7)
        seen: set[int] = set()
        previous = None
        for step in range(length):
            last = step == length - 1
            c = previous if previous is not None and rng.random() < cfg.stay_probability else rng.choice(n_cats, p=preference)
            pool, p = (fresh[c], None) if last and len(fresh[c]) and rng.random() < cfg.cold_target_share else (members[c], weights[c])
            if len(pool) == 0 or len(seen.intersection(pool.tolist())) == len(pool):
                continue
            item = int(rng.choice(pool, p=p))
            while item in seen:
                item = int(rng.choice(pool, p=p))
            seen.add(item)
            previous = c
            clock += rng.exponential(3600.0)
            users.append(f"user_{u:06d}")
            item_ids.append(f"item_{item:06d}")
            times.append(round(clock, 3))
    frame = pd.DataFrame({
        "user": pd.Series(users, dtype=object), "item": pd.Series(item_ids, dtype=object),
        "timestamp": np.asarray(times), "rating": np.nan, "event": None, "weight": np.nan,
        "line": np.arange(1, len(users) + 1),
    })
    counts = RowCounts(rows_read=len(frame))
    source = SourceData(frame, items.frame(), counts, items.bad.counts, [], "timestamp")
    source.notes["synthetic_new_items"] = int(n_new)
    return source
