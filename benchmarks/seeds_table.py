"""Headline table over seeds: mean and spread of what `distrec evaluate` measured.

    python benchmarks/seeds_table.py --title "..." \
        "ID-only=reports_eval/beauty_id_s0,reports_eval/beauty_id_s1,reports_eval/beauty_id_s2" \
        "text+id=reports_eval/beauty_text_s0,..." [--command "..."]

Each group is a label and the report directories of its seeds (each written by `distrec
evaluate --run RUN`, so it names the run it scored). Per group: NDCG@10 and HR@10 over every
test user, the same on the users whose target never occurs in training (new items), catalog
coverage@10, Gini@10 and the training wall time, as mean +- standard deviation over seeds
(sample, n-1) with the lowest and highest value. PROTOCOL.md: 3 seeds for a headline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)
from runs_table import wall_time_and_speed  # noqa: E402

COLUMNS = (("NDCG@10", lambda m: m["accuracy"]["ndcg@10"], 4),
           ("HR@10", lambda m: m["accuracy"]["hr@10"], 4),
           ("new-item NDCG@10", lambda m: m["slices"]["cold_targets"]["ndcg@10"], 4),
           ("new-item HR@10", lambda m: m["slices"]["cold_targets"]["hr@10"], 4),
           ("coverage@10", lambda m: m["beyond@10"]["catalog_coverage"], 3),
           ("Gini@10", lambda m: m["beyond@10"]["gini"], 3))


def spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    sd = statistics.stdev(values)
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def group_row(label: str, reports: list[Path]) -> str:
    metrics = [json.loads((r / "metrics.json").read_text()) for r in reports]
    cells = [spread([float(get(m) or 0.0) for m in metrics], digits) for _, get, digits in COLUMNS]
    minutes = []
    for m in metrics:
        run = m["about"].get("scored_with_run") or m["about"].get("run")
        if run and (Path(run) / "metrics.jsonl").is_file():
            minutes.append(wall_time_and_speed(Path(run))[0] / 60)
    wall = spread(minutes, 1) + " min" if minutes else "-"
    return f"| {label} | {len(metrics)} | " + " | ".join(cells) + f" | {wall} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="+", help="LABEL=REPORT_DIR,REPORT_DIR,...")
    parser.add_argument("--title", default="seeds")
    parser.add_argument("--command", action="append", default=[], help="command that made the reports (repeatable)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows = []
    for group in args.groups:
        label, _, dirs = group.rpartition("=")  # a label may hold "=" (train.epochs=40), paths rarely
        rows.append(group_row(label, [Path(d) for d in dirs.split(",") if d]))
    header = "| model | seeds | " + " | ".join(name for name, _, _ in COLUMNS) + " | training wall time |"
    lines = [f"## {args.title}", "", *[f"`{c}`  " for c in args.command], "",
             "mean +- standard deviation over seeds [lowest, highest]", "",
             header, "|" + "---|" * (len(COLUMNS) + 3), *rows, ""]
    publish("\n".join(lines), append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
