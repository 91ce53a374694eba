"""What `distrec train` may do to a run directory: a resumed run never mixes another dataset or
model shape into its checkpoint, a changed `train.*` setting is said, `run.overwrite=true`
replaces only what distrec wrote, `--init-from` says what it carries over, and a text model
on a dataset without item text is refused. Every refusal leaves the run directory as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from distrec.cli import main
from distrec.train import loop


def _overrides(data_dir, run_dir, *extra):
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", "trackers=[]", "train.batch_size=32",
            "train.eval_batch_size=64", "train.warmup_steps=5", "model.max_len=12", "model.dim=16",
            "model.item_repr=id", *extra]


def snapshot(directory: Path) -> dict:
    """Every file's bytes and every directory under `directory` (what "unchanged" means)."""
    return {p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(directory).rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A finished one-epoch ID run on the shared tiny dataset (copy it before changing it)."""
    run = tmp_path_factory.mktemp("runs") / "first"
    assert main(["train", "--no-progress", *_overrides(data_dir, run, "train.epochs=1")]) == 0
    return run


@pytest.fixture(scope="module")
def reordered_data(tmp_path_factory):
    """Another dataset of the same size: the same item ids, in another order."""
    out = tmp_path_factory.mktemp("data") / "reordered"
    assert main(["prepare", "--source", "synthetic", "--out", str(out), "--no-progress", "synthetic.num_users=240",
                 "synthetic.num_items=80", "synthetic.num_categories=4", "synthetic.mean_length=10",
                 "shards.samples_per_shard=70", "synthetic.seed=1"]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_resume_refuses_another_dataset_before_touching_the_run(cli, data_dir, reordered_data, finished_run,
                                                                  tmp_path):
    ours = pd.read_parquet(data_dir / "items.parquet")["item_id"].tolist()
    theirs = pd.read_parquet(reordered_data / "items.parquet")["item_id"].tolist()
    assert len(ours) == len(theirs) and ours != theirs  # the case: same size, another catalog order
    run = _copy(finished_run, tmp_path)
    before = snapshot(run)
    code, err = cli("train", "--no-progress", "--resume", *_overrides(reordered_data, run, "train.epochs=2"))
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "not the dataset" in line and str(reordered_data) in line and str(data_dir) in line, err
    assert snapshot(run) == before


@pytest.mark.parametrize("change, said", [
    ("model.dim=32", "model.dim 16 -> 32"),  # the weights' shapes
    ("train.batch_size=16", "train.batch_size 32 -> 16"),  # what a step of the checkpoint's position is
    ("train.lr=0.01", "train.lr 0.001 -> 0.01"),  # restored from the checkpoint's schedule state
])
def test_resume_refuses_a_changed_model_shape_before_touching_the_run(cli, data_dir, finished_run, tmp_path,
                                                                      change, said):
    run = _copy(finished_run, tmp_path)
    before = snapshot(run)
    code, err = cli("train", "--no-progress", "--resume", *_overrides(data_dir, run, change))
    assert code == 2, err
    assert said in err and "Traceback" not in err, err
    assert snapshot(run) == before  # config.yaml included: not rewritten for a run that never was


def test_resume_honours_more_epochs_and_says_so(cli, data_dir, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    one = json.loads((run / "results.json").read_text())
    code, err = cli("train", "--no-progress", "--resume", *_overrides(data_dir, run, "train.epochs=2"))
    assert code == 0, err
    assert "train.epochs 1 -> 2" in err, err
    two = json.loads((run / "results.json").read_text())
    assert two["steps"] == 2 * one["steps"] and two["epochs"] == 2
    assert "epochs: 2" in (run / "config.yaml").read_text()
    valid = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "valid"]
    assert valid == [one["steps"], two["steps"]]  # no second validation of the first run's last step


def _crash_at_first_step(monkeypatch):
    def crash(self, batch):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop.Trainer, "_step", crash)


def test_a_first_run_stopped_before_its_checkpoint_is_started_afresh(cli, data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _crash_at_first_step(monkeypatch)
    code, _ = cli("train", "--no-progress", *_overrides(data_dir, run))
    assert code == 130
    monkeypatch.undo()
    code, err = cli("train", "--no-progress", *_overrides(data_dir, run))
    assert code == 2 and "run.overwrite=true" in err and "stopped before its first checkpoint" in err, err
    code, err = cli("train", "--no-progress", "--resume", *_overrides(data_dir, run))
    assert code == 2, err
    assert "has no checkpoint yet (the first run stopped before one was saved)" in err
    assert "start afresh with run.overwrite=true" in err
    code, err = cli("train", "--no-progress", *_overrides(data_dir, run, "train.epochs=1", "run.overwrite=true"))
    assert code == 0, err


def test_a_rerun_of_a_run_with_a_checkpoint_suggests_resume_or_overwrite(cli, data_dir, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    code, err = cli("train", "--no-progress", *_overrides(data_dir, run))
    assert code == 2 and "pass --resume to continue it, or run.overwrite=true to start afresh" in err, err


@pytest.mark.parametrize("where", ["dataset", "parent", "foreign"])
def test_overwrite_never_replaces_a_dataset_or_a_folder_distrec_did_not_write(cli, data_dir, tmp_path, where):
    data = tmp_path / "data" / "ds"
    shutil.copytree(data_dir, data)
    foreign = tmp_path / "mine"
    (foreign / "notes").mkdir(parents=True)
    (foreign / "notes" / "todo.txt").write_text("keep me\n")
    run = {"dataset": data, "parent": data.parent, "foreign": foreign}[where]
    before = snapshot(tmp_path)
    code, err = cli("train", "--no-progress", *_overrides(data, run, "train.epochs=1", "run.overwrite=true"))
    assert code == 2 and str(run) in err, err
    assert snapshot(tmp_path) == before


def test_overwrite_removes_only_distrecs_own_files(cli, data_dir, finished_run, tmp_path, monkeypatch):
    """The old run's checkpoints go (a crash of the new run must not leave the old `last/` to
    resume), files the user put into the run directory stay."""
    run = _copy(finished_run, tmp_path)
    (run / "notes.txt").write_text("my notes\n")
    (run / "scores").mkdir()
    (run / "scores" / "part.txt").write_text("mine\n")
    _crash_at_first_step(monkeypatch)
    code, _ = cli("train", "--no-progress", *_overrides(data_dir, run, "run.overwrite=true"))
    assert code == 130
    monkeypatch.undo()
    assert (run / "notes.txt").read_text() == "my notes\n" and (run / "scores" / "part.txt").read_text() == "mine\n"
    for stale in ("last", "best", "results.json"):
        assert not (run / stale).exists(), stale
    code, err = cli("train", "--no-progress", "--resume", *_overrides(data_dir, run))
    assert code == 2 and "has no checkpoint yet" in err, err
    assert json.loads((run / ".distrec-output.json").read_text())["stage"] == "train"


def _renamed_items(data_dir: Path, out: Path, share: float) -> Path:
    """A copy of the dataset whose item ids are renamed but for the first `share` of them."""
    shutil.copytree(data_dir, out)
    items = pd.read_parquet(out / "items.parquet")
    keep = int(len(items) * share)
    items["item_id"] = [item if i < keep else f"other-{item}" for i, item in enumerate(items["item_id"])]
    items.to_parquet(out / "items.parquet")
    return out


def test_init_from_refuses_a_catalog_sharing_no_item(cli, data_dir, finished_run, tmp_path):
    other = _renamed_items(data_dir, tmp_path / "other", 0.0)
    code, err = cli("train", "--no-progress", "--init-from", finished_run, *_overrides(other, tmp_path / "second"))
    assert code == 2 and "shares no item id" in err and str(other) in err and str(finished_run) in err, err
    assert not (tmp_path / "second").exists()


def test_init_from_warns_when_few_items_are_shared(cli, data_dir, finished_run, tmp_path):
    other = _renamed_items(data_dir, tmp_path / "other", 0.1)
    run = tmp_path / "second"
    code, err = cli("train", "--no-progress", "--init-from", finished_run, *_overrides(other, run, "train.epochs=1"))
    assert code == 0, err
    warning = [line[line.index("warning:"):] for line in err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "10%" in warning[0] and "8 of the 80 items" in warning[0], err
    results = json.loads((run / "results.json").read_text())
    assert results["warnings"] == [warning[0][len("warning: "):]]
    assert results["init_from"]["shared_items"] == 8


def test_init_from_refuses_another_model_shape(cli, data_dir, finished_run, tmp_path):
    code, err = cli("train", "--no-progress", "--init-from", finished_run,
                    *_overrides(data_dir, tmp_path / "second", "model.dim=32"))
    assert code == 2 and "model.dim" in err and "16" in err and "32" in err and str(finished_run) in err, err
    assert not (tmp_path / "second").exists()


def _without_text(data_dir: Path, out: Path, share: float) -> Path:
    """A copy of the dataset where the first `share` of the items have no text (as prepared
    without a catalog)."""
    shutil.copytree(data_dir, out)
    items = pd.read_parquet(out / "items.parquet")
    empty = int(round(len(items) * share))
    items["text"] = ["" if i < empty else text for i, text in enumerate(items["text"])]
    items.to_parquet(out / "items.parquet")
    return out


@pytest.mark.parametrize("repr_", ["text", "text+id"])
def test_a_text_model_on_a_dataset_without_item_text_is_refused(cli, data_dir, backbone, tmp_path, repr_):
    data = _without_text(data_dir, tmp_path / "bare", 1.0)
    run = tmp_path / "run"
    code, err = cli("train", "--no-progress", *_overrides(data, run, f"model.item_repr={repr_}",
                                                          f"model.backbone={backbone}"))
    assert code == 2, err
    assert f"data.dir={data} has no item text (prepared without --items): train item_repr=id, or prepare " \
           "with --items CATALOG" in err, err
    assert not run.exists()


def test_a_text_model_on_a_dataset_with_little_item_text_warns(cli, data_dir, backbone, tmp_path):
    data = _without_text(data_dir, tmp_path / "sparse", 0.95)
    run = tmp_path / "run"
    code, err = cli("train", "--no-progress", *_overrides(data, run, "model.item_repr=text", "train.epochs=1",
                                                          f"model.backbone={backbone}", "peft.method=frozen",
                                                          "model.max_text_tokens=12"))
    assert code == 0, err
    warning = [line[line.index("warning:"):] for line in err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "95%" in warning[0] and "no text" in warning[0], err
    assert json.loads((run / "results.json").read_text())["warnings"] == [warning[0][len("warning: "):]]


def test_resume_accepts_the_same_data_prepared_again_and_refuses_it_changed(cli, tmp_path):
    """The manifest records the time prepare took: the same input prepared again is the same
    dataset (by content); prepared again from other input, it is not."""
    data = tmp_path / "data"
    synthetic = ["synthetic.num_users=240", "synthetic.num_items=80", "synthetic.num_categories=4",
                 "synthetic.mean_length=10", "shards.samples_per_shard=70"]

    def prepare(*extra):
        code, err = cli("prepare", "--source", "synthetic", "--out", data, "--overwrite", *synthetic, *extra)
        assert code == 0, err

    prepare()
    run = tmp_path / "run"
    assert cli("train", "--no-progress", *_overrides(data, run, "train.epochs=1"))[0] == 0
    prepare()
    manifest = json.loads((data / "manifest.json").read_text())  # its timings differ (made sure of here)
    (data / "manifest.json").write_text(json.dumps({**manifest, "seconds": manifest["seconds"] + 1.0}))
    code, err = cli("train", "--no-progress", "--resume", *_overrides(data, run, "train.epochs=2"))
    assert code == 0 and "train.epochs 1 -> 2" in err, err
    prepare("synthetic.seed=2")
    before = snapshot(run)
    code, err = cli("train", "--no-progress", "--resume", *_overrides(data, run, "train.epochs=3"))
    assert code == 2 and f"data.dir={data} has changed since run.dir={run} was trained on it" in err, err
    assert snapshot(run) == before
