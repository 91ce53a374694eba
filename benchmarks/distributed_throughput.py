"""Training throughput of 2 processes against 1 on the same machine, for each launcher config:
one plain process, accelerate with DDP, DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/cpu_*.yaml).

    python benchmarks/distributed_throughput.py [--steps 40] [--data out/demo/data] [--no-append]

The model is the demo's (MiniLM + LoRA item tower, real backbone) on the synthetic data
(prepared into --data if missing). samples/s is read from the run's own log at the last
training step before the final validation (so validation is not counted), over all ranks.
Configurations run one after another on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(config: str | None, data: Path, run_dir: Path, steps: int, threads: int, precision: str) -> dict:
    args = ["-m", "distrec.train", "--no-progress", "--config", "configs/train/demo.yaml", f"data.dir={data}",
            f"run.dir={run_dir}", "trackers=[]", f"train.max_steps={steps}", f"train.eval_every={steps}",
            "train.log_every=10", "train.eval_users=200", f"train.mixed_precision={precision}"]
    cmd = ([str(BIN / "accelerate"), "launch", "--config_file", f"configs/accelerate/{config}.yaml", *args]
           if config else [sys.executable, *args])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DISTREC_EXPECT_WORLD_SIZE": "2" if config else "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{config or 'one process'} failed:\n{result.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    last = [e for e in events if e["event"] == "train"][-1]
    return {"world": start["world_size"], "precision": start["mixed_precision"], "samples_per_s": last["samples_per_s"],
            "distributed": start["distributed"], "zero": start["zero_stage"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", default=str(REPO / "out" / "demo" / "data"))
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "manifest.json").exists():
        subprocess.run([str(BIN / "distrec"), "prepare", "--source", "synthetic", "--out", str(data), "--no-progress"],
                       check=True)
    cases = [("1 process, 2 threads", None, 2, "auto"), ("1 process, 2 threads, fp32", None, 2, "no"),
             ("1 process, 1 thread, fp32", None, 1, "no"), ("2 processes DDP (cpu_ddp)", "cpu_ddp", 1, "auto"),
             ("2 processes DDP fp32 (cpu_ddp)", "cpu_ddp", 1, "no"),
             ("2 processes ZeRO-2 (cpu_zero2)", "cpu_zero2", 1, "auto"),
             ("2 processes ZeRO-3 (cpu_zero3)", "cpu_zero3", 1, "auto")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, threads, precision in cases:
            r = run(config, data, Path(tmp) / name.replace(" ", "_"), args.steps, threads, precision)
            rows.append((name, r))
            print(f"{name}: {r['samples_per_s']:.1f} samples/s ({r['precision']}, world {r['world']})", flush=True)
    base = rows[0][1]["samples_per_s"]
    fp32 = rows[1][1]["samples_per_s"]
    lines = [f"| {name} | {r['world']} | {r['precision']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f} | "
             f"{r['samples_per_s'] / fp32:.2f} |" for name, r in rows]
    text = "\n".join([
        f"## Training throughput: 2 processes vs 1 on the same {os.cpu_count()} cores ({platform.machine()})", "",
        f"`python benchmarks/distributed_throughput.py {' '.join(sys.argv[1:])}`", "",
        f"demo model (MiniLM + LoRA item tower, 32 live items per step, batch 64 per process), synthetic data, "
        f"{args.steps} steps; samples/s over all processes, validation excluded. DeepSpeed on CPU runs fp32.", "",
        "| configuration | processes | precision | samples/s | vs 1 process (bf16) | vs 1 process (fp32) |",
        "|---|---|---|---|---|---|", *lines, ""])
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
