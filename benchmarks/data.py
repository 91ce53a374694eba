"""Reading training shards: distrec's planned reader with the training collate vs raw tar
iteration and a plain webdataset pipeline over the same files, and vs what training consumes.

    python benchmarks/data.py [--data data/ml-1m-sasrec] [--batch 128] [--train-rate 437] [--no-append]

--train-rate: training samples/s to compare against (default: the fastest 2-process CPU
configuration measured by benchmarks/distributed_throughput.py on the demo model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tarfile
import time
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader

from distrec.data.shards import ShardedSamples

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)

REPO = Path(__file__).resolve().parent.parent


def timed(fn) -> tuple[float, int]:
    started = time.perf_counter()
    count = fn()
    return time.perf_counter() - started, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO / "data" / "ml-1m-sasrec"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-history", type=int, default=200)
    parser.add_argument("--train-rate", type=float, default=437.0)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    data = Path(args.data)
    manifest = json.loads((data / "manifest.json").read_text())
    paths = [str(data / s["path"]) for s in manifest["shards"]]
    total = sum(s["samples"] for s in manifest["shards"])

    def raw_tar():
        n = 0
        for path in paths:
            with tarfile.open(path) as tar:
                for member in tar:
                    tar.extractfile(member).read()
                    n += 1
        return n

    def plain_webdataset():
        return sum(1 for _ in wds.WebDataset(paths, shardshuffle=False).decode())

    def distrec_reader(workers):
        def go():
            dataset = ShardedSamples(data, args.batch, max_history=args.max_history)
            loader = DataLoader(dataset, batch_size=None, num_workers=workers)
            return sum(len(batch["keys"]) for batch in loader)
        return go

    rows = []
    for name, fn in (("raw tar iteration (bytes only)", raw_tar),
                     ("webdataset pipeline, decoded JSON", plain_webdataset),
                     ("distrec reader + collate, checksums, 0 workers", distrec_reader(0)),
                     ("distrec reader + collate, checksums, 2 workers", distrec_reader(2))):
        fn()  # warm the page cache
        seconds, count = min(timed(fn) for _ in range(3))
        rows.append((name, count, count / seconds))
        print(f"{name}: {count / seconds:,.0f} samples/s", flush=True)
    ours = rows[2][2]
    lines = [f"| {name} | {count:,} | {rate:,.0f} | {rate / args.train_rate:,.0f}x |" for name, count, rate in rows]
    text = "\n".join([
        f"## Shard reading ({data.name}: {total:,} samples in {len(paths)} shards; {platform.machine()})", "",
        f"`python benchmarks/data.py {' '.join(sys.argv[1:])}`", "",
        f"Batch {args.batch}, histories up to {args.max_history} items (the training collate: left-padded tensors). "
        f"Training consumes {args.train_rate:,.0f} samples/s (fastest measured CPU configuration, demo model).", "",
        "| reader | samples | samples/s | vs training's need |", "|---|---|---|---|", *lines, "",
        f"distrec's reader with the collate runs at {ours / rows[0][2]:.2f}x raw tar iteration and "
        f"{ours / args.train_rate:,.0f}x what training consumes.", ""])
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
