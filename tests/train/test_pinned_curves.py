"""Pinned loss curves (torchtune's regression style): eight optimizer steps of the ID model and
of a tiny BERT + LoRA text model on the session's synthetic data, every step's loss against
values recorded from this code. A refactoring of the trainer, the losses, the models or the
data order that changes what a step computes moves these numbers; one that only moves code
does not. Each curve runs `distrec train` in a fresh process on one thread, as torchtune runs
its recipes: the numbers then depend on neither the machine's core count (the order of
float sums) nor what earlier tests left in this process (an in-process run after the whole
suite moved the text curve by ~4e-4 relative; its cause is not found yet). Re-record with
`python -m tests.train.test_pinned_curves DATA_DIR BACKBONE OUT` (only when a change is meant
to alter training, and say so in the commit)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 8
COMMON = ("trackers=[]", "train.batch_size=32", "train.eval_batch_size=64", "train.warmup_steps=2",
          "model.max_len=12", "model.dim=16", f"train.max_steps={STEPS}", "train.log_every=1",
          "train.eval_every=0", "seed=5")
SETUPS = {
    "id": ("model.item_repr=id", "train.lr=0.01"),
    "bert_lora": ("model.item_repr=text+id", "peft.method=lora", "train.live_items=16", "model.max_text_tokens=12"),
}
# recorded on x86_64 (fp32, CPU); the tolerance covers summation order across CPUs and BLAS builds
PINNED = {
    "id": [4.386595726013184, 4.381328105926514, 4.368167400360107, 4.363443851470947,
           4.339248180389404, 4.3099045753479, 4.330684661865234, 4.295098781585693],
    "bert_lora": [4.43318510055542, 4.468385219573975, 4.400447845458984, 4.400908946990967,
                  4.395627498626709, 4.403563976287842, 4.398166656494141, 4.43049430847168],
}
RTOL = 1e-4


def curve(setup: str, data_dir, backbone, run_dir) -> list[float]:
    extra = (f"model.backbone={backbone}",) if setup != "id" else ()
    args = ["train", "--no-progress", f"data.dir={data_dir}", f"run.dir={run_dir}", *COMMON, *SETUPS[setup], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "distrec", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=1800)  # a bound for a hang, not a speed test
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_loss_curve_is_pinned(setup, data_dir, backbone, tmp_path):
    losses = curve(setup, data_dir, backbone, tmp_path / "run")
    assert len(losses) == STEPS
    assert losses == pytest.approx(PINNED[setup], rel=RTOL)


if __name__ == "__main__":  # re-record: python -m tests.train.test_pinned_curves DATA_DIR BACKBONE OUT
    data, bert, out = sys.argv[1:4]
    print({setup: curve(setup, data, bert, Path(out) / setup) for setup in sorted(SETUPS)})
