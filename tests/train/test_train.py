"""`distrec train` end to end on tiny data and tiny models: outputs, learning, exact resume,
continuing on new logs, and clear errors before any training starts."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

import pandas as pd
import pytest

from distrec.cli import main
from distrec.train import loop


def _overrides(data_dir, run_dir, *extra):
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", "trackers=[]", "train.batch_size=32",
            "train.eval_batch_size=64", "train.warmup_steps=5", "model.max_len=12", "model.dim=16", *extra]


def _train(*args):
    return main(["train", "--no-progress", *map(str, args)])


def test_text_model_with_lora_writes_a_complete_run(data_dir, backbone, tmp_path):
    run = tmp_path / "run"
    assert _train(*_overrides(data_dir, run, f"model.backbone={backbone}", "peft.method=lora", "train.epochs=2",
                              "train.live_items=16", "model.max_text_tokens=12")) == 0
    results = json.loads((run / "results.json").read_text())
    assert {"valid", "test", "test_cold", "test_warm", "parameters"} <= set(results)
    assert results["test"]["users"] == 240 and 0 < results["test_cold"]["users"] < 240
    assert 0 < results["parameters"]["backbone_trainable"] < results["parameters"]["trainable"]
    assert (run / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "config.yaml").is_file()
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events.count("valid") == 2 and events[-1] == "test"


def test_id_model_learns_the_synthetic_signal(data_dir, tmp_path):
    run = tmp_path / "run"
    assert _train(*_overrides(data_dir, run, "model.item_repr=id", "train.epochs=12", "train.lr=0.01",
                              "train.patience=0", "model.dropout=0.1")) == 0
    results = json.loads((run / "results.json").read_text())
    # far above a random ranking of ~80 items (NDCG@10 ~ 0.05), on the items it has seen
    assert results["test_warm"]["ndcg@10"] > 0.12
    assert results["test_cold"]["hr@10"] <= 0.2  # an ID model knows nothing about unseen items


def test_resume_after_a_crash_reaches_the_same_metrics(data_dir, tmp_path, monkeypatch):
    args = ("model.item_repr=id", "train.epochs=4", "train.patience=0", "seed=3")
    assert _train(*_overrides(data_dir, tmp_path / "straight", *args)) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())

    original = loop.Trainer._step
    calls = {"n": 0}

    def crash_after(self, batch):
        calls["n"] += 1
        if calls["n"] == 20:  # in epoch 3 (8 steps an epoch): epochs 1-2 are checkpointed
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    monkeypatch.setattr(loop.Trainer, "_step", crash_after)
    assert _train(*_overrides(data_dir, tmp_path / "crashed", *args)) == 130
    monkeypatch.setattr(loop.Trainer, "_step", original)
    assert json.loads((tmp_path / "crashed" / "last" / "trainer_state.json").read_text())["global_step"] == 16
    assert _train("--resume", *_overrides(data_dir, tmp_path / "crashed", *args)) == 0
    resumed = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert resumed["test"] == straight["test"] and resumed["valid"] == straight["valid"]


def _stopped_or_exited(job: subprocess.Popen, deadline: float) -> int | None:
    """Wait (by polling the process, up to `deadline`) until `job` stops itself (None) or exits
    (its code, set on `job` too: the status was reaped here)."""
    while time.monotonic() < deadline:
        pid, status = os.waitpid(job.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return None
        if pid:
            job.returncode = os.waitstatus_to_exitcode(status)
            return job.returncode
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    raise AssertionError("the training process neither reached its stop point nor exited in 10 minutes")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_at_random_moments_then_resume_reaches_the_same_metrics(data_dir, tmp_path):
    """SIGKILL `distrec train` at random points of its progress (seeded), the resumed runs
    included, with a checkpoint every 3 steps so kills also land inside checkpoint writes;
    re-run the same command (with --resume once a checkpoint exists) until it finishes. The
    test metrics equal an uninterrupted run's and metrics.jsonl holds every step once.

    Kill points are chosen by training progress, never by the clock (a fresh clone on a busy
    machine once saw every timed kill land at the same checkpoint): DISTREC_STOP_AT makes the
    trainer SIGSTOP itself at a random step (one per fifth of the run) and phase (after a
    step, after validation, inside the checkpoint write), and the test then SIGKILLs it."""
    args = ("model.item_repr=id", "train.epochs=24", "train.patience=0", "train.eval_every=3", "seed=5")
    assert _train(*_overrides(data_dir, tmp_path / "straight", *args)) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    total = straight["steps"]
    rng = random.Random(20261129)
    fifths = [(total * i // 5 + 1, total * (i + 1) // 5 - 1) for i in range(5)]
    stops = [(rng.randint(low, high), rng.choice(["step", "validated", "checkpoint"])) for low, high in fifths]
    run, kills, landed = tmp_path / "killed", [], []
    for attempt in range(len(stops) + 1):
        resume = (run / "last" / "trainer_state.json").is_file()
        command = [sys.executable, "-m", "distrec", "train", "--no-progress", *(["--resume"] if resume else []),
                   *_overrides(data_dir, run, *args), *([] if resume else ["run.overwrite=true"])]
        env = dict(os.environ)
        if attempt < len(stops):
            env["DISTREC_STOP_AT"] = "{}:{}".format(*stops[attempt])
        log = tmp_path / f"attempt-{attempt}.err"
        with open(log, "w") as err:
            job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
            code = _stopped_or_exited(job, time.monotonic() + 600)
        if attempt < len(stops):
            assert code is None, f"attempt {attempt} exited ({code}) before its stop {stops[attempt]}: " \
                                 f"{log.read_text()[-3000:]}"
            os.killpg(job.pid, signal.SIGKILL)
            state = run / "last" / "trainer_state.json"
            kills.append(json.loads(state.read_text())["global_step"] if state.is_file() else None)
            landed.append(job.wait())
            continue
        assert code == 0, log.read_text()[-3000:]
    assert len(set(kills)) >= 4, f"kills at {stops} landed at the checkpoints of steps {kills}: not spread over the run"
    assert all(code == -signal.SIGKILL for code in landed)
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["steps"] == straight["steps"]
    assert resumed["test"]["ndcg@10"] == pytest.approx(straight["test"]["ndcg@10"], rel=1e-4, abs=1e-6)
    assert resumed["valid"]["ndcg@10"] == pytest.approx(straight["valid"]["ndcg@10"], rel=1e-4, abs=1e-6)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "valid"]
    assert steps == sorted(set(steps)) == list(range(3, straight["steps"] + 1, 3))
    assert [p.name for p in run.glob(".*")] == [".distrec-output.json"], "a staging or previous checkpoint left behind"


def test_init_from_continues_on_a_grown_catalog(data_dir, tmp_path):
    assert _train(*_overrides(data_dir, tmp_path / "first", "model.item_repr=id", "train.epochs=1")) == 0
    grown = tmp_path / "grown"
    assert main(["prepare", "--source", "synthetic", "--out", str(grown), "--no-progress", "synthetic.num_users=240",
                 "synthetic.num_items=90", "synthetic.num_categories=4", "synthetic.mean_length=10"]) == 0
    assert _train("--init-from", tmp_path / "first", *_overrides(grown, tmp_path / "second", "model.item_repr=id",
                                                                  "train.epochs=1")) == 0
    assert json.loads((tmp_path / "second" / "results.json").read_text())["test"]["users"] == 240


@pytest.mark.parametrize("setup, message", [
    (lambda d, r: [f"data.dir={r}/nowhere", f"run.dir={r}/run"], "not a prepared dataset"),
    (lambda d, r: [f"data.dir={d}"], "data.dir and run.dir are required"),
    (lambda d, r: [f"data.dir={d}", f"run.dir={r}/run", "peft.method=dora"], "peft.method: expected one of"),
    (lambda d, r: [f"data.dir={d}", f"run.dir={r}/run", f"model.backbone={r}/no-model"], "cannot load it"),
])
def test_bad_config_fails_before_training(cli, data_dir, tmp_path, setup, message):
    code, err = cli("train", "--no-progress", *setup(data_dir, tmp_path))
    assert code == 2 and message in err, err


def test_incompatible_dataset_and_existing_run(cli, data_dir, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": "distrec-prepared/0"}))
    code, err = cli("train", "--no-progress", f"data.dir={old}", f"run.dir={tmp_path / 'r'}")
    assert code == 2 and "prepare the data again" in err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("seed: 0\n")  # a config, not a run
    code, err = cli("train", "--no-progress", f"data.dir={data_dir}", f"run.dir={tmp_path / 'r'}", "run.overwrite=true")
    assert code == 2 and "not written by distrec" in err
    (tmp_path / "r" / "metrics.jsonl").write_text("")  # a run of an older distrec, stopped before a checkpoint
    code, err = cli("train", "--no-progress", f"data.dir={data_dir}", f"run.dir={tmp_path / 'r'}")
    assert code == 2 and "already holds a run that stopped before its first checkpoint" in err
    code, err = cli("train", "--no-progress", "--resume", f"data.dir={data_dir}", f"run.dir={tmp_path / 'x'}")
    assert code == 2 and "no checkpoint to resume from" in err


def test_popularity_baseline_matches_a_brute_force_ranking(data_dir, tmp_path):
    import numpy as np

    assert _train(f"data.dir={data_dir}", f"run.dir={tmp_path / 'pop'}", "model.item_repr=popularity",
                  "trackers=[]") == 0
    results = json.loads((tmp_path / "pop" / "results.json").read_text())
    assert results["parameters"]["trainable"] == 0
    items = pd.read_parquet(data_dir / "items.parquet")
    test = pd.read_parquet(data_dir / "test.parquet")
    score = np.log1p(items["train_count"].to_numpy().astype(float))
    ndcg = []
    for history, target in zip(test["history"], test["target"]):
        s = score.copy()
        s[[i for i in history if i != target]] = -np.inf
        higher, equal = (s > s[target]).sum(), (s == s[target]).sum()
        rank = higher + (equal + 1) / 2
        ndcg.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    assert results["test"]["ndcg@10"] == pytest.approx(np.mean(ndcg))


def test_ranking_excludes_the_whole_history_not_only_what_the_model_reads():
    from accelerate import Accelerator

    from distrec.models.config import ModelConfig
    from distrec.models.recommender import Popularity
    from distrec.train.validation import split_ranks

    # popularity 9, 8, ..., 0: item 0 is the most popular; the model reads 2 history items
    model = Popularity(ModelConfig(item_repr="popularity", max_len=2), 10, torch.arange(10, 0, -1))
    frame = pd.DataFrame({"user": [0], "history": [[0, 1, 2, 3]], "target": [5]})
    ranks = split_ranks(model, frame, model.item_table(), Accelerator(cpu=True), batch_size=4)
    assert ranks.tolist() == [2.0]  # only item 4 is above the target once 0-3 are all excluded


def test_content_baseline_matches_a_brute_force_ranking(data_dir, backbone, tmp_path):
    """item_repr=content trains nothing and ranks by cosine between each item's mean-pooled
    text and the decayed mean of the user's 3 latest items: recomputed here straight from
    transformers, with the protocol's tie rule."""
    import numpy as np
    from transformers import AutoModel, AutoTokenizer

    run = tmp_path / "content"
    assert _train(f"data.dir={data_dir}", f"run.dir={run}", "model.item_repr=content", f"model.backbone={backbone}",
                  "model.max_text_tokens=12", "trackers=[]") == 0
    results = json.loads((run / "results.json").read_text())
    assert results["parameters"]["trainable"] == 0
    items = pd.read_parquet(data_dir / "items.parquet")
    test = pd.read_parquet(data_dir / "test.parquet")
    tokenizer, model = AutoTokenizer.from_pretrained(backbone), AutoModel.from_pretrained(backbone).eval()
    with torch.no_grad():
        enc = tokenizer(items["text"].tolist(), truncation=True, max_length=12, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).double().numpy()
    ndcg = []
    for history, target in zip(test["history"], test["target"]):
        recent = list(history)[-3:]
        user = sum(0.5 ** age * vectors[i] for age, i in enumerate(reversed(recent)))
        s = vectors @ (user / np.linalg.norm(user))
        s[[i for i in history if i != target]] = -np.inf
        higher, equal = (s > s[target] + 1e-6).sum(), (np.abs(s - s[target]) <= 1e-6).sum()
        rank = higher + (equal + 1) / 2
        ndcg.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    assert results["test"]["ndcg@10"] == pytest.approx(np.mean(ndcg), abs=2e-3)
    assert results["test"]["ndcg@10"] > 0


def test_text_recipe_trains_with_lora_and_its_whitening_is_checkpointed(data_dir, backbone, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "recipe"
    assert _train(*_overrides(data_dir, run, f"model.backbone={backbone}", "peft.method=lora", "train.epochs=2",
                              "train.live_items=16", "model.max_text_tokens=12", "model.item_repr=text+id",
                              "model.score=cosine", "model.whiten=true", "model.content_init=true",
                              "model.id_max_norm=1.0")) == 0
    results = json.loads((run / "results.json").read_text())
    heads = load_file(str(run / "best" / "heads.safetensors"))
    assert bool(heads["whitening_fitted"]) and heads["text_whitening"].shape == (32, 32)
    assert results["test"]["ndcg@10"] > 0 and results["test_cold"]["users"] > 0
