"""Shared helpers: tiny input files written by the tests, and the CLI run in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from distrec.cli import main
from tests.tiny import tiny_backbone


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


class Prepared:
    """A prepared dataset directory, read back."""

    def __init__(self, out: Path):
        self.out = out
        self.manifest = json.loads((out / "manifest.json").read_text())
        self.items = pd.read_parquet(out / "items.parquet")
        self.users = pd.read_parquet(out / "users.parquet")
        self.val = pd.read_parquet(out / "val.parquet")
        self.test = pd.read_parquet(out / "test.parquet")

    def item_ids(self, indices) -> list[str]:
        return [self.items["item_id"][int(i)] for i in indices]

    def user_row(self, frame: pd.DataFrame, user_id: str):
        index = int(self.users.set_index("user_id")["index"][user_id])
        return frame.set_index("user").loc[index]


@pytest.fixture(autouse=True)
def _environment_restored():
    """The CLI run in-process sets environment variables (distrec.console.quiet, for the
    processes it starts); a later test's subprocesses must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def cli(capsys):
    """Run `distrec ARGS` in-process; return (exit code, stderr)."""

    def run(*args) -> tuple[int, str]:
        code = main([str(a) for a in args] + (["--no-progress"] if args and args[0] == "prepare" else []))
        return code, capsys.readouterr().err

    return run


@pytest.fixture
def prepare(cli, tmp_path):
    """prepare(source, input, *overrides) -> Prepared; asserts success."""

    def run(source: str, input_path=None, *overrides, items=None, out=None) -> Prepared:
        out = out or tmp_path / f"out-{source}"
        args = ["prepare", "--source", source, "--out", out, "--overwrite"]
        if input_path is not None:
            args += ["--input", input_path]
        if items is not None:
            args += ["--items", items]
        code, err = cli(*args, *overrides)
        assert code == 0, err
        return Prepared(Path(out))

    return run


# -- shared by the training and multi-process tests (prepared once per session) --------

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    # 240 users, history >= 3 items each: with model.max_len=3 every sample has exactly 3
    # positions, so the mean loss of two ranks is the mean loss of their union; 70 samples
    # per shard: 4 shards that do not divide over the ranks
    assert main(["prepare", "--source", "synthetic", "--out", str(out), "--no-progress", "synthetic.num_users=240",
                 "synthetic.num_items=80", "synthetic.num_categories=4", "synthetic.mean_length=10",
                 "shards.samples_per_shard=70"]) == 0
    return out


@pytest.fixture(scope="session")
def backbone(data_dir, tmp_path_factory):
    texts = pd.read_parquet(data_dir / "items.parquet")["text"].tolist()
    return tiny_backbone(tmp_path_factory.mktemp("bert"), texts, "bert")


# -- the second stage: a retrieval run, its ranker samples, a ranker (once per session) -----

RANKER_TOKENS = ["ranker.item_tokens=6", "ranker.history_tokens=12", "ranker.history_items=3", "ranker.per_pass=6"]


@pytest.fixture(scope="session")
def retrieval_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("retrieval") / "run"
    assert main(["train", "--no-progress", f"data.dir={data_dir}", f"run.dir={run}", "trackers=[]",
                 "model.item_repr=id", "model.dim=16", "model.max_len=8", "train.epochs=3"]) == 0
    return run


@pytest.fixture(scope="session")
def ranker_samples(data_dir, retrieval_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranker_data") / "samples"
    assert main(["ranker-data", "--run", str(retrieval_run), "--data", str(data_dir), "--out", str(out),
                 "candidates=8", "random=2", "missed=insert", "progress=false"]) == 0
    return out


def ranker_overrides(data_dir, backbone, samples, *more):
    return [f"data.dir={data_dir}", "model.kind=ranker", f"model.backbone={backbone}", f"ranker.samples={samples}",
            *RANKER_TOKENS, "peft.method=lora", "peft.r=2", "train.batch_size=16", "train.warmup_steps=2",
            "train.eval_batch_size=32", "train.mixed_precision=no", "trackers=[]", *more]


@pytest.fixture(scope="session")
def ranker_run(data_dir, backbone, ranker_samples, tmp_path_factory):
    run = tmp_path_factory.mktemp("ranker") / "run"
    assert main(["train", "--no-progress", f"run.dir={run}",
                 *ranker_overrides(data_dir, backbone, ranker_samples, "train.max_steps=12", "train.eval_every=6",
                                   "ranker.retrieval_scale=5")]) == 0
    return run
