"""The CLI as users type it: a real subprocess, exit codes, the demo end to end."""

import json
import subprocess
import sys

import pandas as pd
import pytest


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "distrec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=1800)  # a bound for a hang, not a speed test: CI runs under load


@pytest.mark.ray
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
    # quiet by default: no library warnings, Ray log lines or weight-loading bars; one line per backbone
    for noise in ("Warning", "WARNING", " INFO ", "Loading weights", "core_worker", "warnings.warn"):
        assert noise not in result.stderr, (noise, result.stderr)
    assert result.stderr.count("backbone all-MiniLM-L6-v2:") == 1, result.stderr


def test_verbose_brings_the_library_output_back(tmp_path):
    quiet = _run("prepare", "--source", "synthetic", "--out", tmp_path / "q", "synthetic.num_users=50",
                 "synthetic.num_items=30", "--no-progress")
    assert quiet.returncode == 0, quiet.stderr
    probe = ("import warnings, distrec.cli as c, os; c.quiet({}); "
             "warnings.warn('lib says', FutureWarning); print(os.environ.get('DISTREC_VERBOSE'))")
    silent = subprocess.run([sys.executable, "-c", probe.format(False)], capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-c", probe.format(True)], capture_output=True, text=True)
    assert "lib says" not in silent.stderr and silent.stdout.strip() == "None"
    assert "lib says" in loud.stderr and loud.stdout.strip() == "1"  # inherited by launched processes and Ray workers


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
