"""The ranker's data step (distrec ranker-data) and its training through the one loop
(distrec train with model.kind=ranker): candidates checked against the retriever, the
re-ranked metrics against a plain per-user count, the refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from distrec.catalog import catalog_vectors
from distrec.cli import main
from distrec.models.run import load_model
from distrec.retrieval import Retriever
from distrec.train.validation import candidate_ranks
from tests.conftest import ranker_overrides


def _samples(directory):
    from distrec.data.shards import ShardedSamples

    reader = ShardedSamples(directory, batch_size=1000, shuffle=False)
    return [row for batch in reader for row in zip(batch["history"].tolist(), batch["target"].tolist(),
                                                   batch["candidates"].tolist(), batch["scores"].tolist())]


def test_ranker_data_holds_the_retrievers_candidates_and_every_positive(data_dir, retrieval_run, ranker_samples):
    manifest = json.loads((ranker_samples / "manifest.json").read_text())
    samples = _samples(ranker_samples)
    assert len(samples) == manifest["train"]["samples"] == 240
    items = pd.read_parquet(data_dir / "items.parquet")
    table, popularity, _ = catalog_vectors(retrieval_run, items)
    retriever = Retriever(retrieval_run, items, torch.from_numpy(table), torch.from_numpy(popularity), 8)
    hits = 0
    for history, target, candidates, scores in samples:
        seen = [i for i in history if i >= 0]
        assert len(candidates) == 10 and target in candidates and len(set(candidates)) == 10
        _, top, _, users = retriever([seen])
        top = top[0].tolist()
        hits += target in top
        expected = top if target in top else top[:-1] + [target]
        assert candidates[:8] == expected  # the retriever's order, the positive in the last place if it missed
        assert not set(candidates[8:]) & (set(seen) | set(candidates[:8]))  # random negatives: new, unseen
        np.testing.assert_allclose(scores, table[candidates] @ users[0].numpy(), atol=2e-6)
    assert manifest["train"]["retrieval_recall"] == round(hits / 240, 6)
    val = pd.read_parquet(ranker_samples / "val.parquet")
    _, top, _, _ = retriever(list(val["history"]))
    assert np.stack(val["candidates"].to_numpy()).tolist() == top.tolist()
    recall = float((top.numpy() == val["target"].to_numpy()[:, None]).any(1).mean())
    assert manifest["val"]["retrieval_recall"] == round(recall, 6)
    assert manifest["retrieval_run"]["dir"] == str(retrieval_run.resolve())
    assert "retrieval_recall" not in manifest["test"]  # the test targets are not read here


def test_missed_drop_keeps_only_the_prefixes_whose_positive_was_retrieved(data_dir, retrieval_run, ranker_samples,
                                                                        tmp_path):
    assert main(["ranker-data", "--run", str(retrieval_run), "--data", str(data_dir), "--out", str(tmp_path / "d"),
                 "candidates=8", "random=2", "progress=false"]) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    kept = _samples(tmp_path / "d")
    assert manifest["train"]["missed"] == "drop" and manifest["train"]["prefixes"] == 240
    assert len(kept) == manifest["train"]["samples"] == round(manifest["train"]["retrieval_recall"] * 240)
    assert 0 < len(kept) < 240 and all(target in candidates[:8] for _, target, candidates, _ in kept)
    # the same prefixes, the same candidates as in the 'insert' samples
    unpadded = lambda history: tuple(i for i in history if i >= 0)  # noqa: E731
    inserted = {unpadded(s[0]): s[2] for s in _samples(ranker_samples)}
    assert all(inserted[unpadded(history)][:8] == candidates[:8] for history, _, candidates, _ in kept)


def test_candidate_ranks_count_ties_and_misses():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [1.0, 0.0, 0.0, 0.0]])
    candidates = torch.tensor([[4, 7, 8, 9], [1, 2, 3, 5]])
    ranks = candidate_ranks(scores, candidates, torch.tensor([8, 6]))
    assert ranks[0] == 2.5 and torch.isinf(ranks[1])


def test_a_ranker_trains_through_the_loop_and_its_metrics_match_a_plain_count(data_dir, ranker_run, ranker_samples):
    results = json.loads((ranker_run / "results.json").read_text())
    assert results["steps"] == 12 and results["ranker"]["candidates"] == 8
    assert results["ranker"]["retrieval_run"]["item_repr"] == "id"
    valids = [json.loads(line) for line in (ranker_run / "metrics.jsonl").read_text().splitlines()
              if '"valid"' in line]
    assert len(valids) == 2 and all(0 < v["valid/retrieval_recall"] < 1 for v in valids)
    trains = [json.loads(line)["loss"] for line in (ranker_run / "metrics.jsonl").read_text().splitlines()
              if '"event": "train"' in line]
    assert all(np.isfinite(trains))
    # the test figure, recounted per user from the reloaded best checkpoint
    items = pd.read_parquet(data_dir / "items.parquet")
    model = load_model(ranker_run / "best", items, ranker_run / "tokenizer").eval()
    test = pd.read_parquet(ranker_samples / "test.parquet")
    ndcg = []
    for history, target, candidates, retrieval in zip(test["history"], test["target"], test["candidates"], test["scores"]):
        scores = model.score([list(history)], torch.tensor([list(candidates)]), torch.tensor([list(retrieval)]))[0]
        if target not in list(candidates):
            ndcg.append(0.0)
            continue
        mine = scores[list(candidates).index(target)]
        rank = int((scores > mine).sum()) + 1
        ndcg.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    assert results["test"]["ndcg@10"] == pytest.approx(np.mean(ndcg), abs=2e-3)
    assert results["test"]["users"] == len(test)


def test_ranker_configs_and_inputs_are_refused_before_any_work(cli, data_dir, backbone, ranker_samples, ranker_run,
                                                               tmp_path):
    code, err = cli("train", "--no-progress", f"run.dir={tmp_path / 'r'}", f"data.dir={data_dir}", "model.kind=ranker")
    assert code == 2 and "needs ranker.samples" in err
    # samples made from another dataset
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp_path / "other"), "--no-progress",
                 "synthetic.num_users=60", "synthetic.num_items=80", "synthetic.seed=3"]) == 0
    code, err = cli("train", "--no-progress", f"run.dir={tmp_path / 'r2'}",
                    *ranker_overrides(tmp_path / "other", backbone, ranker_samples, "train.max_steps=1"))
    assert code == 2 and "were made from the dataset" in err and not (tmp_path / "r2").exists()
    # a ranker is not a retrieval run, and ranker-data never writes over a prepared dataset
    code, err = cli("ranker-data", "--run", str(ranker_run), "--data", str(data_dir), "--out", str(tmp_path / "x"))
    assert code == 2 and "is a ranker run" in err
    before = sorted(p.name for p in data_dir.iterdir())
    code, err = cli("ranker-data", "--run", str(ranker_run.parent.parent), "--data", str(data_dir), "--out", str(data_dir))
    assert code == 2
    assert sorted(p.name for p in data_dir.iterdir()) == before
