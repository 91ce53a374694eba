"""`distrec evaluate` on hand-made lists with known metrics, and the report it writes."""

import json

import pandas as pd
import pytest
import torch

from distrec import evaluate as ev
from distrec.cli import main


@pytest.fixture
def toy(tmp_path):
    """4 items in 2 categories, 3 test users; lists written as distrec score writes them."""
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"index": range(4), "item_id": ["a", "b", "c", "d"], "title": "", "text": "",
                  "categories": [["x"], ["x"], ["y"], ["y"]], "held_out": False,
                  "train_count": [3, 2, 1, 0]}).to_parquet(data / "items.parquet")
    pd.DataFrame({"index": range(3), "user_id": ["u", "v", "w"]}).to_parquet(data / "users.parquet")
    pd.DataFrame({"user": [0, 1, 2], "history": [[0], [1, 2], [3]], "target": [1, 3, 0],
                  "cold_target": [False, True, False]}).to_parquet(data / "test.parquet")
    recs = tmp_path / "recs"
    recs.mkdir()
    # u: b first (hit at 1); v: a, d (hit at 2); w: no list at all (a miss)
    pd.DataFrame({"user_id": ["u", "u", "v", "v"], "item_id": ["b", "c", "a", "d"], "rank": [1, 2, 1, 2],
                  "score": 1.0, "relevance": 1.0, "policy": "none"}).to_parquet(recs / "part-00000.parquet")
    return data, recs


def test_accuracy_counts_users_without_lists_as_misses(toy):
    data, recs = toy
    result = ev.evaluate_lists(pd.read_parquet(recs / "part-00000.parquet"), ev.load_data(data))
    acc = result["accuracy"]
    assert acc["users"] == 3
    assert acc["hr@2"] == pytest.approx(2 / 3)  # lists of 2: metrics at 2 only
    assert acc["ndcg@2"] == pytest.approx((1.0 + 1 / torch.log2(torch.tensor(3.0)).item()) / 3)
    assert result["slices"]["cold_targets"]["hr@2"] == 1.0 and result["slices"]["cold_targets"]["users"] == 1
    beyond = result["beyond@2"]
    assert beyond["category_coverage"] == pytest.approx((1.0 + 1.0) / 2)  # u: x, y; v: x, y
    assert beyond["catalog_coverage"] == 1.0 and beyond["gini"] == 0.0


def test_report_files(toy, tmp_path):
    data, recs = toy
    assert main(["evaluate", "--recs", str(recs), "--data", str(data), "--out", str(tmp_path / "rep")]) == 0
    for name in ("metrics.json", "report.md", "report.html", "exposure.png", "slices.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["accuracy"]["hr@2"] == pytest.approx(2 / 3)
    assert "<img src='exposure.png'>" in (tmp_path / "rep" / "report.html").read_text()


def test_unknown_items_are_a_clear_error(toy, tmp_path, cli):
    data, recs = toy
    pd.DataFrame({"user_id": ["u"], "item_id": ["zzz"], "rank": [1], "score": 1.0, "relevance": 1.0,
                  "policy": "none"}).to_parquet(recs / "part-00001.parquet")
    code, err = cli("evaluate", "--recs", recs, "--data", data, "--out", tmp_path / "rep")
    assert code == 2 and "the data directory does not know" in err
