"""benchmarks/gpu_check.py runs where a GPU is lent, rarely and against the clock: its dry run
(the same parts on the CPU at toy sizes) keeps it runnable between those times."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.deepspeed
def test_gpu_check_dry_run_runs_every_part_and_writes_its_json(tmp_path):
    pytest.importorskip("deepspeed")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # not from the repo: sys.path
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result.returncode == 0, (result.stderr[-3000:], {k: v for k, v in results.items() if isinstance(v, dict)})
    for part in ("peak", "actor", "train", "score", "ranker"):
        assert "skipped" not in results[part], results[part]
    assert results["actor"]["rows"] == 3000 and results["actor"]["rows_equal"] == 1.0  # 300 users x k=10
    assert results["score"]["lists_equal_to_fp32"] == 1.0
    train = results["train"]
    assert train["dtype"] == "torch.bfloat16" and train["params_without_embedding"] < train["params"]
    assert train["flops_dense_6n"] > train["flops_lora_4n"] > 0
    assert results["ranker"]["dtype"] == "bfloat16" and results["ranker"]["candidates_per_s"] > 0
    assert (tmp_path / "gpu_check.md").read_text().startswith("## GPU checks")
