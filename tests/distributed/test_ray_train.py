"""`ray job submit` of launch/ray_train.py to a real local Ray cluster of two nodes (a head and
a second `ray start --address`, both on this machine, token auth on as Ray 2.60 ships it):
DeepSpeed ZeRO-2 with LoRA and with AdaLoRA finish and write checkpoints; a training worker
SIGKILLed midway is restarted by Ray and the run resumes from its last checkpoint to the
same validation NDCG@10 as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


pytestmark = [pytest.mark.distributed, pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.timeout(1500)]
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on this machine; torn down by killing exactly their processes (`ray stop`
    would also stop any other Ray on the machine, such as the one this test process uses)."""
    temp = Path(f"/tmp/distrec-ray-{os.getpid()}")  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    head = [RAY, "start", "--head", "--port", str(port), "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--temp-dir", str(temp), "--disable-usage-stats"]
    worker = [RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--node-ip-address", "127.0.0.1"]
    try:
        for cmd in (head, worker):
            started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert started.returncode == 0, started.stderr[-3000:]
        deadline = time.time() + 600  # generous: CI machines run under load
        while True:  # the second node registers with the head a little after `ray start` returns
            status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], env=env,
                                    capture_output=True, text=True, timeout=60)
            if status.stdout.count(" node_") == 2 or time.time() > deadline:
                break
            time.sleep(2)
        assert status.stdout.count(" node_") == 2, status.stdout  # two live nodes
        dashboard_url = f"http://127.0.0.1:{dashboard}"
        while True:  # the dashboard's job agent comes up after the nodes: wait until a job runs
            probe = subprocess.run([RAY, "job", "submit", "--address", dashboard_url, "--", sys.executable, "-c",
                                    "pass"], env=env, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0 or time.time() > deadline + 120:
                break
            time.sleep(3)
        assert probe.returncode == 0, probe.stderr[-2000:]
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        subprocess.run(["pkill", "-9", "-f", f"127.0.0.1:{port}"], check=False)
        shutil.rmtree(temp, ignore_errors=True)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and str(port) in current.read_text():
            current.unlink()


def submit(cluster, run_dir: Path, *overrides: str, wait=True):
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": [".venv", "data", "runs", "recs", "reports", "logs", "out",
                                                          ".git", "benchmarks"]}),
           "--", sys.executable, "launch/ray_train.py", f"run.dir={run_dir}", "trackers=[]", "progress=false",
           "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.zero_stage=2", "ray.placement_strategy=SPREAD",
           "ray.collective_timeout_s=60", *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=1200)


def overrides(data_dir, backbone, method, steps=12):
    return [f"data.dir={data_dir}", f"model.backbone={backbone}", "model.item_repr=text+id", "model.dim=16",
            "model.max_len=6", "model.dropout=0", "model.max_text_tokens=12", f"peft.method={method}", "peft.r=2",
            "peft.adalora_init_r=4", "train.batch_size=8", f"train.max_steps={steps}", "train.eval_every=3",
            "train.live_items=8", "train.warmup_steps=2", "train.eval_batch_size=64", "train.mixed_precision=no"]


def valid_ndcg(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["valid/ndcg@10"] for e in events if e["event"] == "valid"]


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_zero2_job_on_two_nodes_finishes_and_checkpoints(method, cluster, data_dir, backbone, tmp_path):
    result = submit(cluster, tmp_path / "run", *overrides(data_dir, backbone, method, steps=6))
    assert result.returncode == 0 and "succeeded" in result.stdout + result.stderr, (result.stdout + result.stderr)[-4000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    assert (run / "best" / "adapter" / "adapter_model.safetensors").stat().st_size > 1000
    assert json.loads((run / "last" / "trainer_state.json").read_text())["global_step"] == 6
    assert any((tmp_path / ".run.ray").rglob("checkpoint_*"))  # Ray's own record of the checkpoints


def test_a_killed_worker_is_restarted_and_the_run_resumes_to_the_same_ndcg(cluster, data_dir, backbone, tmp_path):
    args = overrides(data_dir, backbone, "lora", steps=15)
    whole = submit(cluster, tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stdout[-3000:]
    job = submit(cluster, tmp_path / "killed", *args, wait=False)
    state = tmp_path / "killed" / "last" / "trainer_state.json"
    deadline = time.time() + 900
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["global_step"] >= 6):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    assert workers, "no Ray Train worker process found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    killed_at = json.loads(state.read_text())["global_step"]
    out, _ = job.communicate(timeout=1200)
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    assert killed_at < 15
    reference, resumed = valid_ndcg(tmp_path / "whole"), valid_ndcg(tmp_path / "killed")
    final = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert final["steps"] == 15
    # the validation at the end of the run: within 1% of the uninterrupted run's
    assert resumed[-1] == pytest.approx(reference[-1], rel=0.01, abs=1e-4)


@pytest.mark.parametrize("setting, message", [
    (["ray.address=127.0.0.1:1"], "no Ray cluster answers at ray.address=127.0.0.1:1"),
    (["ray.zero_stage=1"], "ray.zero_stage must be 0 (DDP), 2 or 3"),
    (["ray.num_workers=0"], "ray.num_workers must be >= 1"),
    (["run.dir=runs/relative"], "run.dir must be an absolute path"),
])
def test_bad_ray_settings_fail_fast_with_what_to_change(setting, message, data_dir, tmp_path):
    started = time.time()
    result = subprocess.run([sys.executable, "launch/ray_train.py", f"data.dir={data_dir}", f"run.dir={tmp_path}/r",
                             *setting], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert time.time() - started < 60
