"""What a `new_item_slots=1` job's lists were before the slot: how many new-item targets the
ranking reached on its own, read off the job's own lists (no second job).

    python benchmarks/slot_free.py --recs recs_eval/ranked_new3_slot --data data/beauty [--k 10]

Exact for policy none with new_item_slots=1 and new_item_rank=k: the slot changes a list
only when its first k hold no new item, and then puts the best new item outside them at
rank k, below the item it displaced (now at k + 1), which the ranking had scored higher.
So the ranking's own top-k holds the target iff the target is at a rank below k, or at rank
k with a relevance at least that of rank k + 1. Users: the test users whose target never
occurs in training (the "cold_targets" slice of `distrec evaluate`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from distrec.score.job import read_recommendations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recs", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    data, k = Path(args.data), args.k
    job = json.loads((Path(args.recs) / "job.json").read_text())["config"]
    if job.get("new_item_slots") != 1 or job.get("new_item_rank") != k or job["policy"]["name"] != "none":
        raise SystemExit(f"{args.recs}: needs a policy-none job with new_item_slots=1 and new_item_rank={k}")
    items = pd.read_parquet(data / "items.parquet")
    users = pd.read_parquet(data / "users.parquet").set_index("index")["user_id"]
    test = pd.read_parquet(data / "test.parquet")
    cold = test[items["train_count"].to_numpy()[test["target"].to_numpy()] == 0]
    recs = read_recommendations(args.recs)
    recs = recs[recs["rank"] <= k + 1]
    by_user = {u: f.set_index("rank") for u, f in recs.groupby("user_id")}
    with_slot = on_own = 0
    for user, target in zip(cold["user"], cold["target"]):
        listed = by_user.get(users[user])
        if listed is None:
            continue
        hit = listed.index[listed["item_id"] == items["item_id"][target]]
        if not len(hit) or hit[0] > k:
            continue
        with_slot += 1
        rank = int(hit[0])
        below = listed["relevance"].get(k + 1, -np.inf)
        on_own += rank < k or listed["relevance"][k] >= below
    n = len(cold)
    print(f"{n} users with a new-item target: HR@{k} {with_slot / n:.4f} with the slot, "
          f"{on_own / n:.4f} of the ranking on its own ({on_own} of {n})")


if __name__ == "__main__":
    main()
