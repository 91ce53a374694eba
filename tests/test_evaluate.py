"""`distrec evaluate` on hand-made lists with known metrics, and the report it writes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distrec import evaluate as ev
from distrec.cli import main
from distrec.config import ConfigError
from distrec.outputs import fingerprint_file


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
    assert "<img src=\"data:image/png;base64," in (tmp_path / "rep" / "report.html").read_text()
    assert "![exposure](exposure.png)" in (tmp_path / "rep" / "report.md").read_text()


def test_unknown_items_are_a_clear_error(toy, tmp_path, cli):
    data, recs = toy
    pd.DataFrame({"user_id": ["w"], "item_id": ["zzz"], "rank": [1], "score": 1.0, "relevance": 1.0,
                  "policy": "none"}).to_parquet(recs / "part-00001.parquet")
    code, err = cli("evaluate", "--recs", recs, "--data", data, "--out", tmp_path / "rep")
    assert code == 2 and "the data directory does not know" in err


# --- what is scored: one whole job, on the dataset it was made from (issue 14) ------------

def _snapshot(directory) -> dict:
    root = Path(directory)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dataset(root: Path, seed: str = "a") -> Path:
    """The toy dataset with a manifest (its content differs with `seed`: another preparation)."""
    data = root / f"data-{seed}"
    data.mkdir(parents=True)
    pd.DataFrame({"index": range(4), "item_id": ["a", "b", "c", "d"], "title": "", "text": "",
                  "categories": [["x"], ["x"], ["y"], ["y"]], "held_out": False,
                  "train_count": [3, 2, 1, 0]}).to_parquet(data / "items.parquet")
    pd.DataFrame({"index": range(3), "user_id": ["u", "v", "w"]}).to_parquet(data / "users.parquet")
    pd.DataFrame({"user": [0, 1, 2], "history": [[0], [1, 2], [3]], "target": [1, 3, 0],
                  "cold_target": [False, True, False]}).to_parquet(data / "test.parquet")
    (data / "manifest.json").write_text(json.dumps({"format": "distrec-prepared/1", "seed": seed}))
    return data


def _part(path: Path, users: list[str], items: list[list[str]], job: str = "job1", block: int = 0) -> None:
    """A part as distrec score writes it: its record (job, block, users, rows) in the footer."""
    rows = [(u, i, r + 1) for u, its in zip(users, items) for r, i in enumerate(its)]
    record = {"job": job, "block": block, "users": len(users), "rows": len(rows)}
    table = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                      "rank": pa.array([r[2] for r in rows], pa.int32()), "score": pa.array([1.0] * len(rows), pa.float32()),
                      "relevance": pa.array([1.0] * len(rows), pa.float32()), "policy": ["mmr"] * len(rows)})
    pq.write_table(table.replace_schema_metadata({b"distrec": json.dumps(record).encode()}), path)


def _scored(root: Path, data: Path, inputs: bool = True, users: str = "test", finished: bool = True) -> Path:
    """A finished distrec score output of the toy users in two blocks (u, v | w) made from `data`."""
    recs = root / "recs"
    recs.mkdir()
    _part(recs / "part-00000.parquet", ["u", "v"], [["b", "c"], ["a", "d"]], block=0)
    _part(recs / "part-00001.parquet", ["w"], [["b", "c"]], block=1)
    job = {"job": "job1", "config": {"run": str(root / "run"), "data": str(data), "out": str(recs), "users": users,
                                     "batch_size": 2, "policy": {"name": "mmr", "strength": 0.3}}}
    if inputs:
        job["inputs"] = {"run": str((root / "run").resolve()), "data": str(data.resolve()),
                         "checkpoint_sha256": "0" * 64, "dataset_manifest_sha256": fingerprint_file(data / "manifest.json"),
                         "dataset_format": "distrec-prepared/1"}
    (recs / "job.json").write_text(json.dumps(job))
    if finished:
        (recs / "summary.json").write_text(json.dumps({"job": "job1", "blocks": 2, "users_total": 3,
                                                       "policy": {"name": "mmr", "strength": 0.3}}))
    return recs


def _refused(recs, data, out, *words, **kwargs) -> str:
    """evaluate refuses in one line naming `words`, and writes nothing (recs unchanged, no out)."""
    before = _snapshot(recs)
    with pytest.raises(ConfigError) as e:
        ev.evaluate(recs, data, out, **kwargs)
    message = str(e.value)
    assert "\n" not in message and all(str(w) in message for w in words), message
    assert _snapshot(recs) == before
    assert not out.exists()
    return message


def test_a_whole_job_on_its_dataset_is_evaluated_without_warnings(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    result = ev.evaluate(recs, data, tmp_path / "rep")
    assert result["accuracy"]["hr@2"] == pytest.approx(2 / 3)  # u hit at 1, v at 2, w misses
    assert result["about"]["policy"] == {"name": "mmr", "strength": 0.3} and result["about"]["job"] == "job1"
    assert [w for w in result["warnings"] if "NDCG" not in w] == []  # only the few-users one


def test_an_existing_report_is_replaced_only_with_overwrite(tmp_path, cli):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    out = tmp_path / "rep"
    ev.evaluate(recs, data, out)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="--overwrite"):
        ev.evaluate(recs, data, out)
    assert _snapshot(out) == before
    code, err = cli("evaluate", "--recs", recs, "--data", data, "--out", out)
    assert code == 2 and "--overwrite" in err and _snapshot(out) == before
    code, err = cli("evaluate", "--recs", recs, "--data", data, "--out", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["accuracy"]["hr@2"] == pytest.approx(2 / 3)


def test_evaluate_never_writes_over_its_inputs_or_a_foreign_folder(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    for out in (recs, data, tmp_path):
        before = _snapshot(tmp_path)
        with pytest.raises(ConfigError, match="input|current directory"):
            ev.evaluate(recs, data, out, overwrite=True)
        assert _snapshot(tmp_path) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not written by distrec"):
        ev.evaluate(recs, data, foreign, overwrite=True)
    assert _snapshot(foreign) == {"notes.txt": b"keep me"}


def test_lists_scored_on_another_dataset_are_refused(tmp_path):
    data_a, data_b = _dataset(tmp_path, "a"), _dataset(tmp_path, "b")  # same ids, another preparation
    recs = _scored(tmp_path, data_a)
    _refused(recs, data_b, tmp_path / "rep", data_a, data_b, "manifest")


def test_older_job_files_are_checked_by_the_dataset_path(tmp_path):
    data_a, data_b = _dataset(tmp_path, "a"), _dataset(tmp_path, "b")
    recs = _scored(tmp_path, data_a, inputs=False)
    _refused(recs, data_b, tmp_path / "rep", data_a, data_b)
    copy = tmp_path / "copy-of-a"
    shutil.copytree(data_a, copy)
    assert ev.evaluate(recs, copy, tmp_path / "rep-copy")["users"] == 3  # a copy of the same dataset is fine
    assert ev.evaluate(recs, data_a, tmp_path / "rep-a")["users"] == 3


def test_a_copied_part_is_refused_not_counted_twice(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    shutil.copy(recs / "part-00001.parquet", recs / "part-00001 (1).parquet")
    _refused(recs, data, tmp_path / "rep", "part-00001.parquet", "part-00001 (1).parquet", "more than one part")


def test_a_user_in_two_parts_is_refused(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    _part(recs / "part-00001.parquet", ["w", "u"], [["b", "c"], ["a", "b"]], block=1)
    _refused(recs, data, tmp_path / "rep", "user u", "part-00000.parquet", "part-00001.parquet")


def test_a_missing_part_is_refused_with_what_to_do(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    (recs / "part-00001.parquet").unlink()
    _refused(recs, data, tmp_path / "rep", "1 of 2 parts", "part-00001.parquet",
             "re-run distrec score with the same arguments to finish the job")


def test_an_unfinished_job_is_refused(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data, finished=False)
    _refused(recs, data, tmp_path / "rep", "did not finish", "re-run distrec score with the same arguments")


def test_a_part_of_another_job_is_refused(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    _part(recs / "part-00001.parquet", ["w"], [["b", "c"]], job="job2", block=1)
    _refused(recs, data, tmp_path / "rep", "part-00001.parquet", "another scoring job")


def test_lists_for_other_users_than_the_test_users_are_refused(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data, users="val")
    _refused(recs, data, tmp_path / "rep", "users=val")


def test_a_corrupt_part_is_one_line_naming_the_file(tmp_path, cli):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    part = recs / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:40])  # truncated
    _refused(recs, data, tmp_path / "rep", part, "corrupt")
    code, err = cli("evaluate", "--recs", recs, "--data", data, "--out", tmp_path / "rep")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(part) in errors[0] and "Traceback" not in err


# --- what the figures are worth ------------------------------------------------------------

def test_few_users_are_warned_with_the_interval_everywhere(tmp_path, cli):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    out = tmp_path / "rep"
    code, err = cli("evaluate", "--recs", recs, "--data", data, "--out", out)
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning: NDCG@2 from 3 test users"))
    assert "95% interval" in warning
    metrics = json.loads((out / "metrics.json").read_text())
    assert any(w.startswith("NDCG@2 from 3 test users") for w in metrics["warnings"])
    assert metrics["accuracy_interval"]["ndcg@2"] > 0
    assert "NDCG@2 from 3 test users" in (out / "report.md").read_text()


def test_a_slice_without_users_is_na_not_zero(tmp_path):
    data = _dataset(tmp_path)
    pd.DataFrame({"user": [0, 1, 2], "history": [[0], [1, 2], [3]], "target": [1, 3, 0],
                  "cold_target": [False, False, False]}).to_parquet(data / "test.parquet")  # no cold targets
    out = tmp_path / "rep"
    ev.evaluate(_scored(tmp_path, data), data, out)
    cold = json.loads((out / "metrics.json").read_text())["slices"]["cold_targets"]
    assert cold["users"] == 0 and cold["ndcg@2"] is None and cold["hr@2"] is None
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| cold_targets"))
    assert "n/a (0 users)" in row and "0.0000" not in row


def test_no_non_writable_array_warning(toy, tmp_path):
    """PyTorch warns once per process about a read-only NumPy array: checked in a fresh one."""
    data, recs = toy
    code = ("import sys, warnings; warnings.simplefilter('error'); from pathlib import Path; "
            "from distrec import evaluate as ev; import pandas as pd; "
            "ev.evaluate_lists(pd.read_parquet(Path(sys.argv[1]) / 'part-00000.parquet'), ev.load_data(Path(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(recs), str(data)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_plain_evaluation_does_not_import_ray(toy, tmp_path):
    data, recs = toy
    code = ("import sys; from distrec import evaluate as ev; "
            "ev.evaluate(sys.argv[1], sys.argv[2], sys.argv[3]); assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code, str(recs), str(data), str(tmp_path / "rep")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# --- distrec demo: sweep, then evaluate into the same folder ---------------------------------

def _fake_sweep(out: Path, data: Path, run: Path | None = None) -> None:
    """What sweep(run, data, out) writes, without training a model for it."""
    from distrec.outputs import mark_output
    from distrec.report import plot_sweep

    point = {"policy": "none", "strength": 0.0, "ndcg@10": 0.5, "ild@10": 0.3, "ild_category": 0.2,
             "category_coverage@10": 0.4, "catalog_coverage@10": 0.5}
    result = {"k": 10, "max_loss": 0.02, "reference_ndcg": 0.5, "run": str((run or out / "run").resolve()),
              "data": str(data.resolve()), "points": [point, {**point, "policy": "mmr", "strength": 0.3}],
              "best_within_loss": {"mmr": {"ild": {**point, "strength": 0.3}, "category_coverage": {**point, "strength": 0.3}}}}
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "evaluate")
    (out / "sweep.json").write_text(json.dumps(result))
    plot_sweep(result, out)


def test_demo_chain_keeps_the_sweep_it_just_wrote(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    out = tmp_path / "eval"
    _fake_sweep(out, data)
    ev.evaluate(recs, data, out, keep_sweep=True)
    md = (out / "report.md").read_text()
    assert "## Accuracy-diversity trade-off" in md and (out / "sweep.json").is_file()
    # a second evaluate into it is a replacement: refused without overwrite, even keeping the sweep
    with pytest.raises(ConfigError, match="--overwrite"):
        ev.evaluate(recs, data, out, keep_sweep=True)


def test_replacing_a_report_drops_a_stale_sweep(tmp_path):
    """A sweep left from an earlier command (of another dataset) is not mixed into a new report."""
    data, other = _dataset(tmp_path, "a"), _dataset(tmp_path, "b")
    recs = _scored(tmp_path, data)
    out = tmp_path / "eval"
    _fake_sweep(out, other)
    ev.evaluate(recs, data, out, overwrite=True)
    assert not (out / "sweep.json").exists() and not (out / "tradeoff.png").exists()
    assert "trade-off" not in (out / "report.md").read_text()
    _fake_sweep(out, other)
    result = ev.evaluate(recs, data, out, overwrite=True, keep_sweep=True)  # kept only if it is this data's
    assert "trade-off" not in (out / "report.md").read_text()
    assert any("sweep.json" in w and "left out" in w for w in result["warnings"])
