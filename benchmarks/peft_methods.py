"""The PEFT methods on one fixed budget: trainable parameters, samples/s, best validation NDCG@10.

    python benchmarks/peft_methods.py --data data/synthetic --steps 120 [key=value ...]

Each method trains the same model (default backbone, item text only) for the same number
of optimizer steps with the same seed, data and schedule; only `peft.method` changes.
Appends the table to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from distrec.config import load_config
from distrec.train.config import TrainConfig
from distrec.train.loop import train

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("lora", "adalora", "adapter", "full", "frozen")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "train" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default=str(ROOT / "runs" / "peft_methods"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--evals", type=int, default=3, help="validations in the budget (each re-encodes the catalog)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        cfg = load_config(TrainConfig, args.config, [
            f"data.dir={args.data}", f"run.dir={args.out}/{method}", "run.overwrite=true", f"peft.method={method}",
            f"train.max_steps={args.steps}", f"train.eval_every={max(args.steps // args.evals, 1)}", "train.patience=0",
            "trackers=[]", "progress=false", *args.overrides])
        started = time.perf_counter()
        results = train(cfg)
        p = results["parameters"]
        rows.append(f"| {method} | {p['backbone_trainable']:,} | {p['trainable']:,} | {results['samples_per_s']:.1f} | "
                    f"{results['valid']['ndcg@10']:.4f} | {results['test']['ndcg@10']:.4f} | "
                    f"{results['test']['hr@10']:.4f} | {results['test_cold']['ndcg@10']:.4f} | "
                    f"{results['test_cold']['hr@10']:.4f} ({results['test_cold']['users']}) | "
                    f"{(time.perf_counter() - started) / 60:.1f} min |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"## PEFT methods on one budget ({args.steps} steps, data {Path(args.data).name}, {Path(args.config).name}"
        + "".join(f", {o}" for o in args.overrides) + ")", "",
        "`python benchmarks/peft_methods.py " + " ".join(sys.argv[1:]) + "`", "",
        "| method | backbone trainable | all trainable | samples/s | best valid NDCG@10 | test NDCG@10 | test HR@10 | "
        "new-item targets NDCG@10 | HR@10 (users) | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, ""])
    publish(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
