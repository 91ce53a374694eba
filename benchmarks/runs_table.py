"""Summarise finished training runs (their results.json) as a Markdown table.

    python benchmarks/runs_table.py --title "ML-1M, leave-one-out, full ranking" runs/ml1m_id runs/...

Every row names the data set, model, PEFT method, seed, steps and wall time of its run;
test figures are read once per run (the best validation checkpoint, PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)



def wall_time_and_speed(run: Path) -> tuple[float, float]:
    """Training wall time summed over the run's sessions (a resume starts a new one) and the
    mean training samples/s, from metrics.jsonl."""
    total, session_last, speeds = 0.0, 0.0, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "start":
            total, session_last = total + session_last, 0.0
        elif record["event"] == "valid":
            session_last = record["seconds"]
        elif record["event"] == "train":
            speeds.append(record["samples_per_s"])
    return total + session_last, sum(speeds) / len(speeds) if speeds else 0.0


def row(run: Path) -> str:
    results = json.loads((run / "results.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = Path(cfg["data"]["dir"]).name
    text = "text" in cfg["model"]["item_repr"]
    model = cfg["model"]["item_repr"] + (f" ({Path(cfg['model']['backbone']).name})" if text else "")
    method = cfg["peft"]["method"] if text else "-"
    seconds, speed = wall_time_and_speed(run)
    t, cold, warm = results["test"], results["test_cold"], results["test_warm"]
    fmt = lambda m: f"{m['ndcg@10']:.4f} / {m['hr@10']:.4f}" if m["users"] else "-"  # noqa: E731
    return (f"| {run.name} | {data} | {model} | {method} | {cfg['seed']} | {results['parameters']['trainable']:,} | "
            f"{results['valid']['ndcg@10']:.4f} | {fmt(t)} | {fmt(cold)} ({cold['users']}) | {fmt(warm)} | "
            f"{results['steps']} ({results['epochs']} ep) | {speed:.0f} | {seconds / 60:.1f} min |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--title", default="training runs")
    parser.add_argument("--command", action="append", default=[], help="command that made the runs (repeatable)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    lines = [f"## {args.title}", "", *[f"`{c}`  " for c in args.command], "",
             "| run | data | items from | PEFT | seed | trainable params | valid NDCG@10 | test NDCG@10 / HR@10 | "
             "cold items (users) | warm items | steps | samples/s | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             *[row(r) for r in args.runs], ""]
    text = "\n".join(lines)
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
