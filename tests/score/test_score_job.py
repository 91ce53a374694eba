"""The Ray scoring job on a local Ray: every user exactly once, seen items never
recommended, the `none` policy equal to the plain kernel, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from distrec import diversity
from distrec.cli import main
from distrec.config import load_config, to_dict
from distrec.metrics import calibration_kl, intra_list_diversity
from distrec.score.config import ScoreConfig
from distrec.score.job import BlockScorer, catalog_and_popularity, read_recommendations

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    assert main(["prepare", "--source", "synthetic", "--out", str(root / "data"), "--no-progress",
                 "synthetic.num_users=300", "synthetic.num_items=120", "synthetic.num_categories=5",
                 "synthetic.mean_length=10"]) == 0
    assert main(["train", "--no-progress", f"data.dir={root / 'data'}", f"run.dir={root / 'run'}", "trackers=[]",
                 "model.item_repr=id", "model.dim=16", "model.max_len=12", "train.epochs=2"]) == 0
    return root


def _score(trained, out, *overrides):
    return main(["score", "--run", str(trained / "run"), "--data", str(trained / "data"), "--out", str(out),
                 "batch_size=64", "k=10", "candidates=40", *overrides])


def test_every_user_once_no_seen_items_and_none_equals_the_kernel(trained, tmp_path):
    assert _score(trained, tmp_path / "recs", "actors=2") == 0
    recs = read_recommendations(tmp_path / "recs")
    test = pd.read_parquet(trained / "data" / "test.parquet")
    users = pd.read_parquet(trained / "data" / "users.parquet")
    items = pd.read_parquet(trained / "data" / "items.parquet")
    assert recs.groupby("user_id").size().to_dict() == {u: 10 for u in users["user_id"][test["user"]]}
    assert (recs.groupby("user_id")["rank"].apply(list) == [list(range(1, 11))] * len(test)).all()
    index = dict(zip(items["item_id"], items["index"]))
    history = dict(zip(users["user_id"][test["user"]], test["history"]))
    assert not any(index[i] in set(history[u]) for u, i in recs[["user_id", "item_id"]].itertuples(index=False))
    # the job's lists equal the kernel run by hand for one block
    cfg = load_config(ScoreConfig, None, [], base={"run": str(trained / "run"), "data": str(trained / "data"),
                                                   "out": str(tmp_path / "x"), "k": 10, "candidates": 40})
    table, popularity = catalog_and_popularity(cfg, items)
    scorer = BlockScorer(to_dict(cfg), table, popularity)
    top, _, _ = scorer.recommend(list(test["history"][:5]))
    for row in range(5):
        user = users["user_id"][test["user"][row]]
        got = recs[recs.user_id == user].sort_values("rank")["item_id"].tolist()
        assert got == items["item_id"].to_numpy()[top[row].numpy()].tolist()
    summary = json.loads((tmp_path / "recs" / "summary.json").read_text())
    assert summary["users_scored"] == 300 and summary["blocks"] == 5


def _scorer(trained, tmp_path, **policy):
    cfg = load_config(ScoreConfig, None, [], base={
        "run": str(trained / "run"), "data": str(trained / "data"), "out": str(tmp_path), "k": 10,
        "candidates": 40, "policy": policy or {"name": "none"}})
    items = pd.read_parquet(trained / "data" / "items.parquet")
    table, popularity = catalog_and_popularity(cfg, items)
    return BlockScorer(to_dict(cfg), table, popularity)


@pytest.mark.parametrize("name, strength", [("mmr", 0.5), ("dpp", 0.5), ("category_cap", 2), ("calibration", 0.9),
                                            ("exposure", 0.1)])
def test_policies_change_the_lists_the_way_they_promise(trained, tmp_path, name, strength):
    histories = list(pd.read_parquet(trained / "data" / "test.parquet")["history"])
    base = _scorer(trained, tmp_path)
    scorer = _scorer(trained, tmp_path, name=name, strength=strength)
    plain, _, _ = base.recommend(histories)
    lists, _, _ = scorer.recommend(histories)
    assert lists.shape == plain.shape == (300, 10) and not torch.equal(lists, plain)
    assert all(len(set(row.tolist())) == 10 for row in lists)
    cats = scorer.categories
    if name in ("mmr", "dpp"):
        assert intra_list_diversity(lists, scorer.table) > intra_list_diversity(plain, scorer.table)
    if name == "category_cap":
        per_list = [torch.bincount(cats[row][cats[row] >= 0]).max().item() for row in lists]
        assert max(per_list) <= 2 < max(torch.bincount(cats[row][cats[row] >= 0]).max().item() for row in plain)
    if name == "calibration":
        profiles = diversity.category_profile(histories, cats, len(scorer.category_names))
        assert calibration_kl(lists, cats, profiles) < calibration_kl(plain, cats, profiles)
    if name == "exposure":
        assert torch.bincount(lists.flatten()).max() < torch.bincount(plain.flatten()).max()
        assert len(torch.unique(lists)) > len(torch.unique(plain))


def test_bad_input_fails_before_any_work(cli, trained, tmp_path):
    code, err = cli("score", "--run", tmp_path / "nothing", "--data", trained / "data", "--out", tmp_path / "o")
    assert code == 2 and "not a distrec checkpoint" in err
    code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", tmp_path / "o",
                    "policy.name=mmr", "policy.strength=3")
    assert code == 2 and "out of range" in err
    code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", tmp_path / "o",
                    "policy.name=magic")
    assert code == 2 and "policy.name: expected one of" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", tmp_path / "other")
    assert code == 2 and "not a distrec score output" in err
    # a dataset without the users' histories: one line on the driver, before Ray starts
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / "data", broken)
    (broken / "test.parquet").unlink()
    code, err = cli("score", "--run", trained / "run", "--data", broken, "--out", tmp_path / "o2")
    assert code == 2 and "no test.parquet" in err
    pd.DataFrame({"user": [0], "target": [1]}).to_parquet(broken / "test.parquet")
    code, err = cli("score", "--run", trained / "run", "--data", broken, "--out", tmp_path / "o2")
    assert code == 2 and "test.parquet: missing column(s) ['history']" in err


@pytest.mark.timeout(300)
def test_killed_job_rerun_scores_every_user_exactly_once(trained, tmp_path):
    out = tmp_path / "recs"
    args = [sys.executable, "-m", "distrec", "score", "--run", str(trained / "run"), "--data", str(trained / "data"),
            "--out", str(out), "batch_size=2", "actors=1", "policy.name=dpp"]
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    # (no `ray stop`: it would also take down the Ray this test process uses; the killed
    # job's own Ray processes share its fate, and a block they finish meanwhile is simply done)
    parts_before = len(list(out.glob("part-*.parquet")))
    assert 3 <= parts_before < 150, "the job finished before it could be killed"
    assert subprocess.run(args[:-1] + ["policy.name=dpp"], capture_output=True).returncode == 0
    recs = read_recommendations(out)
    assert recs.groupby("user_id").size().eq(20).all() and recs["user_id"].nunique() == 300
    assert len(recs) == 300 * 20  # every user exactly once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["blocks_skipped"] >= parts_before
    assert summary["users_scored"] == 300 - 2 * summary["blocks_skipped"]


def test_sweep_draws_the_tradeoff_and_picks_within_the_loss(trained, tmp_path):
    from distrec.evaluate import sweep

    result = sweep(trained / "run", trained / "data", tmp_path / "sweep", k=10, candidates=40,
                   policies={"mmr": [0.0, 0.3, 0.6], "category_cap": [10, 2]})
    assert (tmp_path / "sweep" / "tradeoff.png").stat().st_size > 10_000
    none = result["points"][0]
    mmr0 = next(p for p in result["points"] if p["policy"] == "mmr" and p["strength"] == 0.0)
    assert mmr0["ndcg@10"] == pytest.approx(none["ndcg@10"])  # strength 0 is no re-ranking
    strong = next(p for p in result["points"] if p["policy"] == "mmr" and p["strength"] == 0.6)
    assert strong["ild@10"] > none["ild@10"]
    for best in result["best_within_loss"].values():
        assert best["ild"]["ndcg@10"] >= 0.98 * result["reference_ndcg"]


@pytest.mark.timeout(300)
def test_full_disk_inside_an_actor_is_one_clear_line_and_a_rerun_completes(trained, tmp_path):
    """An OS error in a Ray actor (fault-injected ENOSPC when it writes a part) comes out of
    Ray's wrappers as the CLI's one-line message and exit 1; the same command then completes.
    38 blocks: Ray Data tasks of 8 blocks each, so the error comes from inside a task's loop."""
    out = tmp_path / "recs"
    args = [sys.executable, "-m", "distrec", "score", "--run", str(trained / "run"), "--data", str(trained / "data"),
            "--out", str(out), "batch_size=8", "actors=1"]
    failed = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "DISTREC_FAULT_SCORE_WRITE": "ENOSPC"})
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(out) in errors[0]
    assert "Traceback" not in failed.stderr
    assert not list(out.glob("part-*")) and not list(out.glob(".part-*"))
    assert subprocess.run(args, capture_output=True).returncode == 0
    recs = read_recommendations(out)
    assert len(recs) == 300 * 20 and recs.groupby("user_id").size().eq(20).all()


def test_actor_layout_one_actor_per_node_by_default():
    from distrec.score.job import actor_layout

    assert actor_layout([2], blocks=6, asked=0, one=False) == (1, 2)
    assert actor_layout([8, 8, 4], blocks=6, asked=0, one=False) == (3, 4)  # every actor fits every node
    assert actor_layout([8, 8], blocks=1, asked=0, one=False) == (1, 8)
    assert actor_layout([8, 8], blocks=6, asked=3, one=False) == (3, 5)
    assert actor_layout([2], blocks=6, asked=4, one=False) == (4, 1)
    assert actor_layout([8, 4], blocks=6, asked=0, one=True) == (1, 8)  # exposure: one actor, on one node


def test_user_frame_all_is_the_test_history_then_its_target_and_empty_without_one(tmp_path):
    from distrec.score.job import user_count, user_frame

    pd.DataFrame({"index": [0, 1, 2, 3], "user_id": ["a", "b", "c", "d"]}).to_parquet(tmp_path / "users.parquet")
    pd.DataFrame({"user": [2, 0, 3], "history": [[5, 6], [], [7]], "target": [9, 4, 8]}).to_parquet(
        tmp_path / "test.parquet")
    frame = user_frame(tmp_path, "all")
    assert frame["user"].tolist() == [0, 1, 2, 3]
    assert [list(h) for h in frame["history"]] == [[4], [], [5, 6, 9], [7, 8]]
    assert [list(h) for h in user_frame(tmp_path, "test")["history"]] == [[5, 6], [], [7]]
    assert user_count(tmp_path, "all") == 4 and user_count(tmp_path, "test") == 3


def test_gpu_layout_one_actor_per_gpu_with_the_cpus_shared():
    from distrec.score.job import gpu_layout

    assert gpu_layout([16], [2], blocks=100, asked=0, one=False) == (2, 8)
    assert gpu_layout([16, 8], [4, 0], blocks=100, asked=0, one=False) == (4, 4)  # the CPU-only node holds none
    assert gpu_layout([16, 16], [2, 2], blocks=3, asked=0, one=False) == (3, 8)  # at most the blocks
    assert gpu_layout([16], [2], blocks=100, asked=5, one=False) == (2, 8)  # at most the GPUs
    assert gpu_layout([16], [2], blocks=100, asked=0, one=True) == (1, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_clear_line(cli, trained, tmp_path):
    code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", tmp_path / "o",
                    "device=cuda")
    assert code == 2 and "device=cuda: this machine has no CUDA GPU" in err
