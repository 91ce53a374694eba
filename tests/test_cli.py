"""The CLI as users type it: a real subprocess, exit codes, the demo end to end."""

import json
import subprocess

import pandas as pd
import sys


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "distrec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_demo_runs_end_to_end_with_the_default_backbone(tmp_path):
    """The README's first command, shrunk: the real packaged MiniLM with LoRA."""
    result = _run("demo", "--out", tmp_path / "demo", "synthetic.num_users=300", "synthetic.num_items=200",
                  "train.epochs=1", "trackers=[]", "progress=false")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "demo" / "data" / "manifest.json").read_text())
    assert manifest["num_users"] == 300 and manifest["splits"]["test"]["users"] == 300
    results = json.loads((tmp_path / "demo" / "run" / "results.json").read_text())
    assert results["test"]["users"] == 300 and results["parameters"]["backbone_trainable"] > 0
    assert (tmp_path / "demo" / "run" / "best" / "adapter" / "adapter_config.json").is_file()
    for name in ("metrics.json", "sweep.json", "report.html", "report.md", "tradeoff.png", "exposure.png"):
        assert (tmp_path / "demo" / "eval" / name).stat().st_size > 0, name
    assert "Accuracy-diversity trade-off" in (tmp_path / "demo" / "eval" / "report.md").read_text()
    recs = pd.concat(pd.read_parquet(p) for p in (tmp_path / "demo" / "recs").glob("part-*.parquet"))
    assert recs["user_id"].nunique() == 300 and (recs["policy"] == "mmr").all()
    assert "[1/4] prepare" in result.stderr and "[2/4] train" in result.stderr and "demo finished" in result.stderr


def test_missing_arguments_are_named():
    result = _run("score", "--data", "x", "--out", "y")
    assert result.returncode == 2 and "--run, --data and --out are required" in result.stderr
    result = _run("evaluate", "--data", "x", "--out", "y")
    assert result.returncode == 2 and "--recs is required" in result.stderr


def test_help_config_lists_every_key():
    result = _run("prepare", "--help-config")
    assert result.returncode == 0
    keys = [line.split(" ")[0] for line in result.stdout.splitlines()]
    assert {"source", "split.mode", "filter.min_rating", "shards.samples_per_shard", "columns.category_separator"} <= set(keys)


def test_bad_input_exit_code_without_traceback(tmp_path):
    bad = tmp_path / "d" / "d.inter"
    bad.parent.mkdir()
    bad.write_text("user_id:token\titem_id:token\nu1\n")
    result = _run("prepare", "--source", "recbole", "--input", bad.parent, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert "d.inter:2: expected 2 columns (user_id, item_id), found 1" in result.stderr
    assert "Traceback" not in result.stderr
