"""Checkpoints of a training run and resume from them.

- `best/`: the model alone (safetensors, its PEFT adapter, model.json), what score, evaluate
  and `--init-from` read; written at each better validation (ZeRO-3 shards gathered first).
- `last/`: everything an exact resume needs (accelerate's state: model, optimizer, schedule,
  every rank's RNG; `trainer_state.json`: the position in the epoch), written at each
  validation into a staging directory and published by rename, so a kill at any moment leaves
  the previous whole `last/` (distrec.atomic).
- `metrics.jsonl`: on resume, trimmed back to the checkpoint's step.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from distrec.atomic import publish_dir, staging_for, write_atomic
from distrec.config import ConfigError
from distrec.models.run import save_model


@dataclass
class TrainerState:
    """Where training stands; saved beside the resume checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # loader steps done in `epoch`
    global_step: int = 0  # optimizer steps
    best_ndcg: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    done: bool = False
    seconds: float = 0.0  # training wall time over all sessions of the run (resumes add up)


def save_last(acc, run_dir: Path, state: TrainerState, before_publish=lambda: None) -> None:
    """last/ from every rank, published whole by the main process (`before_publish`: called on
    it between the staging copy and the rename, for the fault tests)."""
    last = run_dir / "last"
    staging = staging_for(last)
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    acc.wait_for_everyone()
    staging.mkdir(parents=True, exist_ok=True)  # every rank writes into it (its RNG state, ZeRO shards)
    acc.save_state(str(staging), safe_serialization=True)
    acc.wait_for_everyone()  # every rank's files are in before the directory is published
    if acc.is_main_process:
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state)))
        before_publish()
        publish_dir(staging, last)
    acc.wait_for_everyone()


def save_best(acc, wrapped, model, run_dir: Path, peft_cfg, item_ids: list) -> None:
    state = acc.get_state_dict(wrapped)  # gathers ZeRO-3 shards
    if acc.is_main_process:
        save_model(model, run_dir / "best", peft_cfg, item_ids, state)
    acc.wait_for_everyone()


def load_last(acc, run_dir: Path) -> TrainerState:
    """Restore last/ into the prepared objects; refuse in one line a state that is not plain
    tensors (accelerate reads the optimizer, scheduler and RNG files with
    torch.load(weights_only=True), but skips an unreadable RNG file: resume would not be exact)."""
    last = run_dir / "last"
    try:
        from accelerate.utils import load as weights_only_load

        for rng in last.glob("random_states_*.pkl"):
            weights_only_load(rng)
        acc.load_state(str(last))
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        why = lines[0].split(" was not")[0] if lines else "not plain tensors"
        raise ConfigError(f"{last}: cannot read the resume state, refused without running "
                          f"it ({why}); distrec did not write these files: train into a new run.dir")
    return TrainerState(**json.loads((last / "trainer_state.json").read_text()))


def trim_metrics(run_dir: Path, step: int) -> None:
    """On resume: forget what was logged after the checkpoint (those steps run again) and
    a line cut short by the kill, so metrics.jsonl reads as one uninterrupted run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(f"{line}\n" for line in kept))
