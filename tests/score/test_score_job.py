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
from distrec.models.run import load_model
from distrec.score.config import ScoreConfig
from distrec.score.actor import BlockScorer
from distrec.score.job import catalog_and_popularity, read_recommendations

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


@pytest.fixture(scope="module")
def retrained(trained):
    """The same dataset trained again with another model.dim, in another run folder."""
    assert main(["train", "--no-progress", f"data.dir={trained / 'data'}", f"run.dir={trained / 'run_dim8'}",
                 "trackers=[]", "model.item_repr=id", "model.dim=8", "model.max_len=12", "train.epochs=1"]) == 0
    return trained / "run_dim8"


def _snapshot(directory) -> dict:
    """{relative path: bytes} of every file under `directory`."""
    from pathlib import Path

    root = Path(directory)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    # the job's lists against brute force, user by user: the model's user vector (one user at a
    # time, no padding) against every item, seen items out, the k best scores. Compared by score
    # (the job batches users: float rounding may swap two near-equal items, never change a score)
    model = load_model(trained / "run" / "best", items).eval()
    position = {item: i for i, item in enumerate(items["item_id"])}
    with torch.no_grad():
        table = model.item_table()
        for user, hist in zip(users["user_id"][test["user"]], test["history"]):
            scores = table @ model.user_vectors(torch.tensor([list(hist)]), table)[0]
            scores[torch.tensor(list(hist))] = float("-inf")
            got = recs[recs.user_id == user].sort_values("rank")["item_id"].map(position).to_numpy()
            torch.testing.assert_close(scores[torch.tensor(got)], scores.topk(10).values, atol=1e-5, rtol=0)
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
    code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", tmp_path / "other",
                    "--overwrite")
    assert code == 2 and "not written by distrec" in err and "choose another output directory" in err
    assert _snapshot(tmp_path / "other") == {"file.txt": b"x"}
    # the dataset or the run as --out: refused, whatever --overwrite says, nothing written
    data_before, run_before = _snapshot(trained / "data"), _snapshot(trained / "run")
    for out in (trained / "data", trained / "run", trained):
        code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", out, "--overwrite")
        assert code == 2 and "never" in err and "input" in err, err
    assert _snapshot(trained / "data") == data_before and _snapshot(trained / "run") == run_before
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


@pytest.mark.timeout(1800)
def test_killed_job_rerun_scores_every_user_exactly_once(trained, tmp_path):
    out = tmp_path / "recs"
    args = [sys.executable, "-m", "distrec", "score", "--run", str(trained / "run"), "--data", str(trained / "data"),
            "--out", str(out), "batch_size=2", "actors=1", "policy.name=dpp"]
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # killed once its third part is written, however long Ray takes to start on a loaded machine
    # (a fresh-clone CI beside four training jobs took more than 240 s to write its first part)
    deadline = time.time() + 1200
    while time.time() < deadline and job.poll() is None and len(list(out.glob("part-*.parquet"))) < 3:
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


@pytest.mark.timeout(1200)  # two CLI runs, each starting its own Ray: over 150 s each on a loaded machine
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
    env = {k: v for k, v in os.environ.items() if k != "DISTREC_VERBOSE"}
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0
    # quiet by default: no Ray INFO lines, progress logging or core-worker lines, only the result
    assert done.stderr.splitlines() == [line for line in done.stderr.splitlines() if line.startswith("scored 300 users")]
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
    from distrec.score.actor import user_count, user_frame

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


# -- what a job is, and when a part is done (issue 14) ------------------------------------

def _copy_run(source, target):
    import shutil

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def _part_jobs(out) -> set:
    import pyarrow.parquet as pq

    return {json.loads(pq.read_metadata(p).metadata[b"distrec"])["job"] for p in out.glob("part-*.parquet")}


def test_a_retrained_run_is_another_job_refused_until_overwrite_which_removes_only_its_files(cli, trained, retrained,
                                                                                             tmp_path):
    """The run folder retrained (model.dim 16 -> 8) after a job was killed half-way: the re-run
    used to keep the old model's parts and score the rest with the new one, exit 0."""
    run = _copy_run(trained / "run", tmp_path / "run")
    out = tmp_path / "recs"
    args = ("score", "--run", run, "--data", trained / "data", "--out", out, "batch_size=64", "k=10", "candidates=40")
    assert cli(*args)[0] == 0
    job = json.loads((out / "job.json").read_text())
    assert set(job["inputs"]) >= {"run", "data", "checkpoint_sha256", "dataset_manifest_sha256", "dataset_format"}
    assert job["inputs"]["dataset_format"].startswith("distrec-prepared") and job["config"]["k"] == 10
    for block in (3, 4):  # the job was killed before these blocks
        (out / f"part-{block:05d}.parquet").unlink()
    (out / "notes.txt").write_text("mine")  # a file of the user's
    before = _snapshot(out)
    _copy_run(retrained, run)  # retrained in place
    code, err = cli(*args)
    assert code == 2 and "different scoring job" in err and "checkpoint" in err and "--overwrite" in err
    assert _snapshot(out) == before  # nothing written, nothing removed
    code, err = cli(*args, "--overwrite")
    assert code == 0, err
    new_job = json.loads((out / "job.json").read_text())
    assert new_job["job"] != job["job"] and new_job["inputs"]["checkpoint_sha256"] != job["inputs"]["checkpoint_sha256"]
    assert _part_jobs(out) == {new_job["job"]} and len(list(out.glob("part-*.parquet"))) == 5
    assert (out / "notes.txt").read_text() == "mine"
    assert len(read_recommendations(out)) == 300 * 10


def test_a_changed_dataset_or_setting_is_another_job(cli, trained, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    out = tmp_path / "recs"
    args = ("score", "--run", trained / "run", "--data", data, "--out", out, "batch_size=64", "k=10", "candidates=40")
    assert cli(*args)[0] == 0
    before = _snapshot(out)
    raw = (data / "manifest.json").read_bytes()  # prepared again: another manifest
    manifest = json.loads(raw)
    (data / "manifest.json").write_text(json.dumps({**manifest, "notes": {**manifest["notes"], "x": 1}}))
    code, err = cli(*args)
    assert code == 2 and "different scoring job" in err and "dataset" in err
    (data / "manifest.json").write_bytes(raw)
    assert _snapshot(out) == before
    code, err = cli(*args[:-1], "candidates=30")
    assert code == 2 and "different scoring job" in err and "candidates 40 -> 30" in err
    assert _snapshot(out) == before
    # the same job again: resumed, nothing scored twice
    code, err = cli(*args)
    assert code == 0 and json.loads((out / "summary.json").read_text())["blocks_skipped"] == 5


def test_a_truncated_or_foreign_part_is_scored_again(cli, trained, tmp_path):
    out = tmp_path / "recs"
    args = ("score", "--run", trained / "run", "--data", trained / "data", "--out", out, "batch_size=64", "k=10",
            "candidates=40")
    assert cli(*args)[0] == 0
    whole = read_recommendations(out).sort_values(["user_id", "rank"], ignore_index=True)
    part = lambda b: out / f"part-{b:05d}.parquet"  # noqa: E731
    part(1).write_bytes(part(1).read_bytes()[:-100])  # truncated: the footer is gone
    part(2).write_bytes(part(0).read_bytes())  # block 0's part under block 2's name
    table = pd.read_parquet(part(3))
    table.iloc[:50].to_parquet(part(3))  # a readable part without the job's record
    code, err = cli(*args)
    assert code == 0, err
    assert "3 part(s)" in err and "scored again" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts_redone"] == 3 and summary["blocks_skipped"] == 2 and summary["users_scored"] == 3 * 64
    again = read_recommendations(out).sort_values(["user_id", "rank"], ignore_index=True)
    pd.testing.assert_frame_equal(again, whole)


def _brute_force_lists(trained, histories):
    """Each user's unseen items by descending dot product, from the model alone."""
    from distrec.data.shards import left_pad
    from distrec.models.run import load_model

    items = pd.read_parquet(trained / "data" / "items.parquet")
    model = load_model(trained / "run" / "best", items, trained / "run" / "tokenizer").eval()
    with torch.no_grad():
        table = model.item_table().float()
        scores = model.user_vectors(left_pad(histories, 0), table).float() @ table.T
    lists = []
    for row, history in enumerate(histories):
        unseen = sorted(set(range(len(items))) - set(int(i) for i in history), key=lambda i: -scores[row, i].item())
        lists.append([(items["item_id"][i], scores[row, i].item()) for i in unseen])
    return lists


def test_k_beyond_the_unseen_items_gives_shorter_lists_without_seen_items(cli, trained, tmp_path):
    """k = candidates = the catalog (120): every user has fewer unseen items than k. Their seen
    items used to fill the lists (with -inf relevance); now the lists are exactly the
    unseen items, best first, as brute force over the model's scores says."""
    out = tmp_path / "recs"
    code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", out, "batch_size=64",
                    "k=120", "candidates=120")
    assert code == 0, err
    recs = read_recommendations(out)
    test = pd.read_parquet(trained / "data" / "test.parquet")
    users = pd.read_parquet(trained / "data" / "users.parquet")
    reference = _brute_force_lists(trained, list(test["history"]))
    assert torch.isfinite(torch.tensor(recs["relevance"].to_numpy())).all()
    by_user = dict(list(recs.sort_values("rank").groupby("user_id")))
    for row, user in enumerate(users["user_id"][test["user"]]):
        got = by_user[user]
        expected = reference[row]
        assert got["rank"].tolist() == list(range(1, len(expected) + 1))
        assert sorted(got["item_id"]) == sorted(i for i, _ in expected)  # every unseen item, no seen one
        score_of = dict(expected)
        assert got["relevance"].to_numpy() == pytest.approx([score_of[i] for i in got["item_id"]], rel=1e-4, abs=1e-4)
        assert (got["relevance"].diff().dropna() <= 1e-5).all()  # best first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["short_lists"] == 300 and summary["rows"] == len(recs) == sum(len(r) for r in reference)
    assert "fewer than k=120" in err


def _item_counts(out):
    return read_recommendations(out)["item_id"].value_counts()


def test_exposure_with_an_impossible_cap_reports_the_share_reached(cli, trained, tmp_path):
    """A 1% cap (3 lists per item) for 300 users x 10 items cannot be kept: the lists are
    filled over it, and summary.json says by how much."""
    out = tmp_path / "recs"
    code, err = cli("score", "--run", trained / "run", "--data", trained / "data", "--out", out, "batch_size=64",
                    "k=10", "candidates=40", "actors=2", "policy.name=exposure", "policy.strength=0.01")
    assert code == 0, err
    exposure = json.loads((out / "summary.json").read_text())["exposure"]
    counts = _item_counts(out)
    assert exposure["cap_per_item"] == 3
    assert exposure["max_item_share"] == pytest.approx(counts.max() / 300, abs=1e-6) and counts.max() > 3
    assert exposure["items_over_cap"] == int((counts > 3).sum()) > 0
    assert 0 < exposure["users_filled_over_cap"] <= 300
    assert "could not be kept" in err and "users had too few candidates" in err


def test_exposure_cap_holds_across_a_resumed_job(cli, trained, tmp_path):
    """Cap 90 lists per item (strength 0.3): kept by the whole job, and still kept after a
    re-run that scores 3 of the 5 blocks again (it used to count from zero)."""
    out = tmp_path / "recs"
    args = ("score", "--run", trained / "run", "--data", trained / "data", "--out", out, "batch_size=64", "k=10",
            "candidates=40", "policy.name=exposure", "policy.strength=0.3")
    assert cli(*args)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exposure"]["users_filled_over_cap"] == 0 and _item_counts(out).max() <= 90
    for block in (0, 1, 2):
        (out / f"part-{block:05d}.parquet").unlink()
    assert cli(*args)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["blocks_skipped"] == 2 and len(read_recommendations(out)) == 3000
    counts = _item_counts(out)
    assert counts.max() <= 90 and summary["exposure"]["max_item_lists"] == counts.max()
    assert summary["exposure"]["items_over_cap"] == 0 and summary["exposure"]["users_filled_over_cap"] == 0


def test_help_config_states_every_policy_strength_range_and_the_exposure_guarantee(capsys):
    assert main(["score", "--help-config"]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.startswith("policy.strength"))
    for said in ("none: ignored", "mmr: diversity weight in [0, 1]", "dpp: relevance trade-off in [0, 1)",
                 "calibration: weight in [0, 1]", "category_cap: most items of one category per list, a whole number",
                 "exposure: largest share of the job's users one item may reach, in (0, 1]",
                 "ceil(strength x users) lists per item across the whole job", "exposure.max_item_share"):
        assert said in line, said


@pytest.mark.parametrize("slots, window", [(1, 10), (2, 5)])
def test_new_item_slots_match_a_plain_reference(trained, tmp_path, slots, window):
    """new_item_slots against a per-user reference written from the definition: the list
    keeps its order, and where its first `window` hold fewer than `slots` new items, the
    user's best unseen new items (by the model's score) go in at the end of the window."""
    histories = list(pd.read_parquet(trained / "data" / "test.parquet")["history"])
    items = pd.read_parquet(trained / "data" / "items.parquet")
    new = set(items.index[items["train_count"] == 0].tolist())
    assert len(new) >= 3
    base = _scorer(trained, tmp_path)
    cfg = load_config(ScoreConfig, None, [], base={
        "run": str(trained / "run"), "data": str(trained / "data"), "out": str(tmp_path), "k": 10,
        "candidates": 40, "new_item_slots": slots, "new_item_rank": window})
    table, popularity = catalog_and_popularity(cfg, items)
    scorer = BlockScorer(to_dict(cfg), table, popularity)
    plain, _, _ = base.recommend(histories)
    lists, _, _ = scorer.recommend(histories)
    with torch.no_grad():
        users = base.model.user_vectors(diversity_left_pad(histories), base.table)
    changed = moved = 0
    for row, history in enumerate(histories):
        listed = plain[row].tolist()
        have = sum(i in new for i in listed[:window])
        need = max(0, slots - have)
        # a new item listed below the window is a candidate too: it moves up
        pool = sorted((i for i in new if i not in set(history) and i not in listed[:window]),
                      key=lambda i: -float(users[row] @ base.table[i]))
        extra = pool[:need]
        cut = window - len(extra)
        expected = (listed[:cut] + extra + [i for i in listed[cut:] if i not in extra])[:10]
        moved += any(i in listed[window:] for i in extra)
        assert lists[row].tolist() == expected, row
        changed += bool(extra)
        assert sum(i in new for i in lists[row].tolist()[:window]) >= min(slots, have + len(pool))
    assert changed > 0 and (moved > 0 or window == 10), (changed, moved)  # k = 10: nothing below a window of 10


def diversity_left_pad(histories):
    from distrec.data.shards import left_pad

    return left_pad(histories, 0)


def test_category_similarity_makes_mmr_spread_categories(trained, tmp_path):
    """policy.similarity=category: alike = same category; MMR then spreads the categories of a
    list (its category ILD rises over the item-vector similarity's)."""
    from distrec.score.job import catalog_vectors

    histories = list(pd.read_parquet(trained / "data" / "test.parquet")["history"])
    items = pd.read_parquet(trained / "data" / "items.parquet")
    lists = {}
    for similarity in ("model", "category"):
        cfg = load_config(ScoreConfig, None, [], base={
            "run": str(trained / "run"), "data": str(trained / "data"), "out": str(tmp_path), "k": 10,
            "candidates": 40, "policy": {"name": "mmr", "strength": 0.7, "similarity": similarity}})
        table, popularity, similar = catalog_vectors(cfg, items)
        if similarity == "category":
            cats = BlockScorer(to_dict(cfg), table, popularity).categories
            assert similar.shape == (len(items), int(cats.max()) + 1)
            assert (similar.sum(1) == (cats >= 0).numpy()).all()
        lists[similarity] = BlockScorer(to_dict(cfg), table, popularity, similar=similar).recommend(histories)[0]
    cats = _scorer(trained, tmp_path).categories
    distinct = {s: sum(len(set(cats[row].tolist())) for row in rows) for s, rows in lists.items()}
    assert distinct["category"] > distinct["model"]


def test_text_similarity_needs_a_text_run(trained, tmp_path):
    from distrec.config import ConfigError
    from distrec.score.job import catalog_vectors

    cfg = load_config(ScoreConfig, None, [], base={
        "run": str(trained / "run"), "data": str(trained / "data"), "out": str(tmp_path),
        "policy": {"name": "mmr", "similarity": "text"}})
    with pytest.raises(ConfigError, match="no text item tower"):
        catalog_vectors(cfg, pd.read_parquet(trained / "data" / "items.parquet"))


def test_sweep_measures_and_diversifies_with_the_similarity_asked(trained, tmp_path):
    """sweep(similarity=category): mmr's "alike" and ILD's are the category; ILD then is the
    share of list pairs in different categories, and strong MMR raises it."""
    from distrec.evaluate import sweep

    result = sweep(trained / "run", trained / "data", tmp_path / "sweep", k=10, candidates=40,
                   policies={"mmr": [0.0, 0.9]}, similarity="category")
    assert result["similarity"] == "category"
    none, strong = result["points"][0], result["points"][-1]
    model = sweep(trained / "run", trained / "data", tmp_path / "sweep-model", k=10, candidates=40,
                  policies={"mmr": [0.0]})
    assert none["ndcg@10"] == pytest.approx(model["points"][0]["ndcg@10"])  # the same lists before re-ranking
    assert none["ild@10"] != pytest.approx(model["points"][0]["ild@10"])  # measured with another "alike"
    assert strong["ild@10"] > none["ild@10"]
    assert strong["category_coverage@10"] >= none["category_coverage@10"]


def test_an_empty_history_gets_the_most_popular_items(trained, tmp_path):
    """Nothing to go on: the catalog's most trained-on items, against a plain sort of the counts
    (compared by count: equal counts may come in either order)."""
    scorer = _scorer(trained, tmp_path)
    items = pd.read_parquet(trained / "data" / "items.parquet")
    picked, _, empty = scorer.recommend([[], [0, 1]])
    counts = torch.tensor(items["train_count"].to_numpy())
    assert empty == 1
    assert counts[picked[0]].tolist() == sorted(counts.tolist(), reverse=True)[:10]
    assert set(picked[1].tolist()).isdisjoint({0, 1})  # a user with a history: seen items never come back


def test_a_policy_registered_by_a_test_alone_runs_through_the_config_the_scorer_and_the_sweep(
        trained, tmp_path, monkeypatch):
    """One registry entry and nothing else: the config accepts it, the job's scorer, the Ray
    scoring job (its actors get the driver's entry) and the sweep run it."""
    from distrec import policies
    from distrec.evaluate import sweep

    toy = policies.Policy("reverse", "ignored", lambda s: s == 0,
                          lambda c, p: diversity.top_k(c.relevance, c.k).flip(1), sweep=(0.0,))
    monkeypatch.setitem(policies.POLICIES, "reverse", toy)
    cfg = load_config(ScoreConfig, None, ["policy.name=reverse", "policy.strength=0"])
    assert cfg.policy.name == "reverse"
    histories = list(pd.read_parquet(trained / "data" / "test.parquet")["history"][:8])
    plain, _, _ = _scorer(trained, tmp_path).recommend(histories)
    reversed_, _, _ = _scorer(trained, tmp_path, name="reverse", strength=0.0).recommend(histories)
    assert torch.equal(reversed_, plain.flip(1))
    # the Ray job: each user's list is the plain job's list reversed
    assert _score(trained, tmp_path / "plain") == 0
    assert _score(trained, tmp_path / "reverse", "policy.name=reverse", "policy.strength=0") == 0
    lists = {name: read_recommendations(tmp_path / name).sort_values(["user_id", "rank"])
             .groupby("user_id")["item_id"].apply(list) for name in ("plain", "reverse")}
    assert len(lists["reverse"]) == 300
    assert (lists["reverse"] == lists["plain"].apply(lambda items: items[::-1])).all()
    result = sweep(trained / "run", trained / "data", tmp_path / "sweep", k=10, candidates=40)
    toy_point = next(p for p in result["points"] if p["policy"] == "reverse")
    none = result["points"][0]
    assert toy_point["ndcg@10"] != none["ndcg@10"]  # the same items in another order
    for same in ("ild@10", "catalog_coverage@10", "category_coverage@10"):  # ... so the same sets
        assert toy_point[same] == pytest.approx(none[same])


@pytest.mark.timeout(1200)
def test_a_block_slower_than_ray_datas_no_progress_timeout_still_finishes(trained, tmp_path):
    """Ray Data fails a dataset that yields nothing for its no-progress timeout (30 min by
    default); a task of several slow blocks (a ranker on a loaded CPU) outlasted it. Here the
    timeout is 0.2 s, shorter than any task: the job must still finish, every user once."""
    out = tmp_path / "slow"
    env = {**os.environ, "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "0.2"}
    done = subprocess.run([sys.executable, "-m", "distrec", "score", "--run", str(trained / "run"), "--data",
                           str(trained / "data"), "--out", str(out), "k=5", "candidates=20", "batch_size=50",
                           "progress=false"], env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = read_recommendations(out)
    assert recs["user_id"].nunique() == len(pd.read_parquet(trained / "data" / "test.parquet"))


@pytest.mark.timeout(600)
def test_a_local_rays_scoring_workers_run_at_the_drivers_niceness():
    """A local Ray starts workers at nice 15, which starved the scoring actors beside any other
    process; distrec's local Ray starts them at 0 (a fresh interpreter: a Ray of its own)."""
    probe = ("import os, ray\n"
             "from distrec.score.config import ScoreConfig\n"
             "from distrec.score.job import _init_ray\n"
             "_init_ray(ScoreConfig(), False)\n"
             "print('nice', ray.get(ray.remote(lambda: os.nice(0)).remote()))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"nice {os.nice(0)}" in done.stdout
