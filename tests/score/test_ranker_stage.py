"""The two-stage scoring job: the ranker re-scores the retrieval candidates inside the Ray
actors; its lists against a plain per-user reference, both scores kept, the retrieval
ceiling and the paired comparison in evaluate, every user exactly once after a lost part,
and the refusals of a ranker that does not fit the job."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from distrec.catalog import catalog_vectors
from distrec.cli import main
from distrec.evaluate import paired_bootstrap
from distrec.models.run import load_model
from distrec.retrieval import Retriever
from distrec.score.job import read_recommendations

pytestmark = pytest.mark.ray

N = 8  # ranker.candidates


def _score(retrieval_run, data_dir, out, *overrides):
    return main(["score", "--run", str(retrieval_run), "--data", str(data_dir), "--out", str(out), "batch_size=64",
                 "k=5", "candidates=12", *overrides])


@pytest.fixture(scope="module")
def two_stage(retrieval_run, ranker_run, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_stage")
    assert _score(retrieval_run, data_dir, out / "ranked", f"ranker.run={ranker_run}", f"ranker.candidates={N}",
                  "ranker.precision=fp32") == 0
    assert _score(retrieval_run, data_dir, out / "retrieval") == 0
    return out


def test_the_ranker_reorders_the_retrieval_candidates_as_a_plain_loop_does(two_stage, retrieval_run, ranker_run,
                                                                           data_dir):
    recs = read_recommendations(two_stage / "ranked").sort_values(["user_id", "rank"])
    test = pd.read_parquet(data_dir / "test.parquet")
    users = pd.read_parquet(data_dir / "users.parquet").set_index("index")["user_id"]
    assert recs["user_id"].nunique() == len(test) and not recs.duplicated(["user_id", "rank"]).any()
    items = pd.read_parquet(data_dir / "items.parquet")
    table, popularity, _ = catalog_vectors(retrieval_run, items)
    retriever = Retriever(retrieval_run, items, torch.from_numpy(table), torch.from_numpy(popularity), 12)
    ranker = load_model(ranker_run / "best", items, ranker_run / "tokenizer").eval()
    by_user = {u: frame for u, frame in recs.groupby("user_id")}
    for user, history in list(zip(test["user"], test["history"]))[:40]:
        relevance, candidates, _, _ = retriever([list(history)])
        top, retrieved = candidates[0, :N], relevance[0, :N]
        scores = ranker.score([list(history)], top.unsqueeze(0), retrieved.unsqueeze(0))[0]
        order = torch.sort(scores, descending=True, stable=True).indices[:5]
        listed = by_user[users[user]]
        assert list(listed["item_id"]) == [items["item_id"][int(i)] for i in top[order]]
        np.testing.assert_allclose(listed["relevance"], scores[order].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(listed["retrieval_score"], retrieved[order].numpy(), rtol=1e-5, atol=1e-6)
    plain = read_recommendations(two_stage / "retrieval")
    np.testing.assert_array_equal(plain["relevance"], plain["retrieval_score"])  # one stage: the same score
    summary = json.loads((two_stage / "ranked" / "summary.json").read_text())
    assert summary["users_scored"] == len(test)


def test_new_items_join_the_ranker_candidates_and_the_slot_takes_its_best(retrieval_run, ranker_run, data_dir,
                                                                          tmp_path):
    """ranker.new_items=2: each user's two best-scored unseen new items (outside the top N) are
    re-scored beside the retrieved; new_item_slots=1 then takes the new item the ranker scored
    highest (its scores in both columns), against a plain per-user loop."""
    assert _score(retrieval_run, data_dir, tmp_path / "cold", f"ranker.run={ranker_run}", f"ranker.candidates={N}",
                  "ranker.precision=fp32", "ranker.new_items=2", "new_item_slots=1") == 0
    recs = read_recommendations(tmp_path / "cold").sort_values(["user_id", "rank"])
    test = pd.read_parquet(data_dir / "test.parquet")
    users = pd.read_parquet(data_dir / "users.parquet").set_index("index")["user_id"]
    items = pd.read_parquet(data_dir / "items.parquet")
    new = np.flatnonzero(items["train_count"].to_numpy() == 0)
    assert len(new) >= 3
    table, popularity, _ = catalog_vectors(retrieval_run, items)
    retriever = Retriever(retrieval_run, items, torch.from_numpy(table), torch.from_numpy(popularity), 12)
    ranker = load_model(ranker_run / "best", items, ranker_run / "tokenizer").eval()
    by_user = {u: frame for u, frame in recs.groupby("user_id")}
    slotted = 0
    for user, history in zip(test["user"], test["history"]):
        relevance, candidates, _, vector = retriever([list(history)])
        top, retrieved = candidates[0, :N].tolist(), relevance[0, :N].tolist()
        scored = {int(i): float(vector[0] @ torch.from_numpy(table[i])) for i in new
                  if i not in set(history) and i not in top}
        cold = sorted(scored, key=lambda i: -scored[i])[:2]
        pool, first = top + cold, retrieved + [scored[i] for i in cold]
        scores = ranker.score([list(history)], torch.tensor([pool]), torch.tensor([first]))[0]
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        listed = [pool[j] for j in order[:5]]
        values = [(float(scores[j]), first[j]) for j in order[:5]]
        if not any(i in set(new.tolist()) for i in listed):
            # the new item the ranker scored highest (retrieved or added), at the end of the window
            j = next(j for j in order if pool[j] in set(new.tolist()))
            listed, values = listed[:4] + [pool[j]], values[:4] + [(float(scores[j]), first[j])]
            slotted += 1
        got = by_user[users[user]]
        assert list(got["item_id"]) == [items["item_id"][i] for i in listed]
        np.testing.assert_allclose(got["relevance"], [v for v, _ in values], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["retrieval_score"], [r for _, r in values], rtol=1e-5, atol=1e-5)
    assert slotted > 0


def test_evaluate_reports_the_retrieval_ceiling_and_a_paired_interval(two_stage, data_dir, tmp_path):
    assert main(["evaluate", "--recs", str(two_stage / "ranked"), "--data", str(data_dir), "--out",
                 str(tmp_path / "ev"), "--compare", str(two_stage / "retrieval")]) == 0
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    test = pd.read_parquet(data_dir / "test.parquet")
    cands = pd.concat([pd.read_parquet(p) for p in sorted((two_stage / "ranked").glob("candidates-*.parquet"))])
    users = pd.read_parquet(data_dir / "users.parquet").set_index("index")["user_id"]
    ids = pd.read_parquet(data_dir / "items.parquet")["item_id"]
    listed = set(zip(cands["user_id"], cands["item_id"]))
    recall = np.mean([(users[u], ids[t]) in listed for u, t in zip(test["user"], test["target"])])
    assert result["retrieval"]["candidates"] == N
    assert result["retrieval"][f"recall@{N}"] == pytest.approx(recall)
    assert main(["evaluate", "--recs", str(two_stage / "retrieval"), "--data", str(data_dir), "--out",
                 str(tmp_path / "ev1")]) == 0
    other = json.loads((tmp_path / "ev1" / "metrics.json").read_text())
    c = result["compare"]["ndcg@5"]  # the lists are 5 long: compared at 5
    assert c["this"] == pytest.approx(result["accuracy"]["ndcg@5"])
    assert c["other"] == pytest.approx(other["accuracy"]["ndcg@5"])
    assert c["difference"] == pytest.approx(c["this"] - c["other"])
    assert c["interval95"][0] <= c["difference"] <= c["interval95"][1]
    assert "Retrieval stage" in (tmp_path / "ev" / "report.md").read_text()


def test_paired_bootstrap_on_known_cases():
    same = paired_bootstrap(np.full(50, 0.7), np.full(50, 0.2))
    assert same["difference"] == pytest.approx(0.5) and same["interval95"] == pytest.approx([0.5, 0.5])
    rng = np.random.default_rng(1)
    a, b = rng.random(400), rng.random(400)
    result = paired_bootstrap(a, b, samples=1000, seed=3)
    reference = np.random.default_rng(3)
    means = [(a - b)[reference.integers(0, 400, size=(100, 400))].mean(1) for _ in range(10)]
    np.testing.assert_allclose(result["interval95"], np.percentile(np.concatenate(means), [2.5, 97.5]))


def test_a_lost_part_is_scored_again_and_every_user_comes_once(two_stage, retrieval_run, ranker_run, data_dir,
                                                               tmp_path):
    out = two_stage / "ranked"  # its own folder (the output path is part of the job), whole again after
    whole = read_recommendations(out).sort_values(["user_id", "rank"]).reset_index(drop=True)
    (out / "part-00001.parquet").unlink()  # a kill between a block's candidates and its part
    (out / "part-00003.parquet").write_bytes(b"truncated")
    (out / "summary.json").unlink()
    assert _score(retrieval_run, data_dir, out, f"ranker.run={ranker_run}", f"ranker.candidates={N}",
                  "ranker.precision=fp32") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["blocks_skipped"] == summary["blocks"] - 2 and summary["parts_redone"] == 1
    again = read_recommendations(out).sort_values(["user_id", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(again, whole)


def test_a_ranker_that_does_not_fit_the_job_is_refused_before_any_work(cli, two_stage, retrieval_run, ranker_run,
                                                                       data_dir, tmp_path):
    def refused(*overrides, run=retrieval_run):
        code, err = cli("score", "--run", str(run), "--data", str(data_dir), "--out", str(tmp_path / "never"),
                        "k=5", "candidates=12", f"ranker.candidates={N}", *overrides)
        assert code == 2 and not (tmp_path / "never").exists()
        return err

    assert "is not a ranker run" in refused(f"ranker.run={retrieval_run}")
    assert "the ranker goes in ranker.run" in refused(run=ranker_run)
    other = tmp_path / "other_catalog"
    shutil.copytree(ranker_run, other)
    meta = json.loads((other / "best" / "model.json").read_text())
    meta["item_ids"], meta["num_items"] = meta["item_ids"][:-1], meta["num_items"] - 1
    (other / "best" / "model.json").write_text(json.dumps(meta))
    err = refused(f"ranker.run={other}")
    assert "not on the same catalog" in err and str(other) in err and str(retrieval_run) in err
    another = tmp_path / "other_retriever"
    shutil.copytree(ranker_run, another)
    results = json.loads((another / "results.json").read_text())
    results["ranker"]["retrieval_run"]["item_repr"] = "text+id"
    (another / "results.json").write_text(json.dumps(results))
    err = refused(f"ranker.run={another}")
    assert "model.item_repr=text+id" in err and "model.item_repr=id" in err
    # another ranker is another job: the folder of the first is not mixed with it
    copy = tmp_path / "copy"
    shutil.copytree(ranker_run, copy)
    code, err = cli("score", "--run", str(retrieval_run), "--data", str(data_dir), "--out", str(two_stage / "ranked"),
                    "batch_size=64", "k=5", "candidates=12", f"ranker.run={copy}", f"ranker.candidates={N}",
                    "ranker.precision=fp32")
    assert code == 2 and "different scoring job" in err
