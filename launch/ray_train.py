"""distrec training on Ray: a `TorchTrainer` whose workers run the same training loop as
`distrec train` and `accelerate launch`, with DeepSpeed ZeRO through accelerate, reusing the
process group Ray made.

    ray job submit --working-dir . -- python launch/ray_train.py \\
        --config configs/train/demo.yaml data.dir=/shared/data run.dir=/shared/runs/x \\
        ray.num_workers=2 ray.zero_stage=2 [ray.use_gpu=true ray.cpus_per_worker=4 ...]

`ray.*` settings go to Ray (see RayConfig below, or `--help-config`); everything else is
the training config. data.dir and run.dir must be absolute paths every node can read (a
shared file system); run.dir also serves as Ray's storage path. Each worker checkpoints
into run.dir/last at every validation and reports it to Ray; a worker that dies makes Ray
restart the group (up to ray.max_failures times), which resumes from the last checkpoint
(exact resume: model, optimizer, schedule, RNG, position in the epoch). When retries run
out the job fails, says so, and run.dir/last keeps the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from distrec.config import ConfigError, doc, from_dict, help_text, load_config
from distrec.train.config import TrainConfig

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


@dataclass
class RayConfig:
    address: str = doc("Ray cluster address (auto = the cluster this job was submitted to, or a local one)",
                       default="auto")
    num_workers: int = doc("training processes (one per GPU when use_gpu)", default=2)
    use_gpu: bool = doc("one GPU per worker", default=False)
    cpus_per_worker: float = doc("CPUs reserved per worker (fractions allowed: on small machines leave "
                                 "room for Ray's own tasks)", default=1.0)
    zero_stage: int = doc("DeepSpeed ZeRO stage 2 or 3; 0 = plain DDP", default=2)
    deepspeed_config: str = doc("a DeepSpeed JSON (default: configs/deepspeed/{cpu_,}zero<stage>.json)",
                                default="")
    max_failures: int = doc("times Ray restarts the workers after a failure, resuming from the last "
                            "checkpoint", default=2)
    collective_timeout_s: int = doc("gloo/NCCL collective timeout: a hang fails after this", default=1800)
    placement_strategy: str = doc("PACK (workers on as few nodes as possible) or SPREAD", default="PACK")

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError("ray.num_workers must be >= 1 and ray.cpus_per_worker > 0")
        if self.zero_stage not in (0, 2, 3):
            raise ValueError("ray.zero_stage must be 0 (DDP), 2 or 3")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError("ray.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")


def deepspeed_json(ray_cfg: RayConfig) -> str | None:
    if not ray_cfg.zero_stage:
        return None
    if ray_cfg.deepspeed_config:
        return str(Path(ray_cfg.deepspeed_config).resolve())
    prefix = "" if ray_cfg.use_gpu else "cpu_"
    return str(DEEPSPEED_CONFIGS / f"{prefix}zero{ray_cfg.zero_stage}.json")


def _unreachable(address: str) -> str | None:
    """Why a host:port Ray address cannot be reached (None if it answers or is not host:port).
    ray.init itself waits minutes on a dead address before failing."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        return str(e)
    return None


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray worker: restore the last checkpoint if Ray restarted us, then train."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from distrec.train.loop import train

    cfg = from_dict(TrainConfig, config["train"])
    run_dir = Path(cfg.run.dir)
    rank = ray.train.get_context().get_world_rank()
    os.environ["DISTREC_DIST_TIMEOUT"] = str(config["collective_timeout_s"])
    torch.set_num_threads(max(1, int(config["threads"])))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and not (run_dir / "last" / "trainer_state.json").exists():
        checkpoint.to_directory(str(run_dir / "last"))  # a node without the shared copy
    resume = (run_dir / "last" / "trainer_state.json").exists()
    if not resume:
        cfg.run.overwrite = True  # a first attempt, or one that died before its first checkpoint

    def report(record: dict) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        # every rank reports, the same number of times; only rank 0 names the checkpoint: last/ is
        # on the shared file system with every rank's ZeRO shards in it, and a checkpoint from
        # each rank made Ray persist world-size copies of the whole directory per validation
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(run_dir / "last")) if rank == 0 else None)

    plugin = None
    if config["deepspeed_json"]:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=config["deepspeed_json"], zero3_init_flag=False)
    results = train(cfg, resume=resume, deepspeed_plugin=plugin, on_checkpoint=report)
    if rank == 0:
        print(json.dumps({"test": results["test"], "world_size": results["world_size"],
                          "steps": results["steps"]}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="distrec training on a Ray cluster (Ray Train + DeepSpeed)")
    parser.add_argument("--config", help="a YAML of training settings (configs/train/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every setting and exit")
    parser.add_argument("overrides", nargs="*", help="key=value; ray.* go to Ray, the rest to training")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(help_text(RayConfig, "ray.") + help_text(TrainConfig)))
        return 0
    try:
        ray_cfg = load_config(RayConfig, None, [o[len("ray."):] for o in args.overrides if o.startswith("ray.")])
        cfg = load_config(TrainConfig, args.config, [o for o in args.overrides if not o.startswith("ray.")])
        for name in ("data.dir", "run.dir"):
            value = cfg.data.dir if name == "data.dir" else cfg.run.dir
            if not value or not Path(value).is_absolute():
                raise ConfigError(f"{name} must be an absolute path every Ray node can read (a shared file "
                                  f"system), got {value!r}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    problem = _unreachable(ray_cfg.address)
    if problem:
        print(f"error: no Ray cluster answers at ray.address={ray_cfg.address} ({problem}); start one with "
              "`ray start --head` (launch/ray_cluster.sh head) or pass the head's host:port", file=sys.stderr)
        return 2

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    address = ray_cfg.address if ray_cfg.address != "auto" or os.environ.get("RAY_ADDRESS") else None
    if address is None:  # a local Ray of its own: workers at nice 0, not Ray's 15 (distrec.score.job._init_ray)
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as e:
        print(f"error: no Ray cluster answers at ray.address={ray_cfg.address} ({e}); start one with "
              "`ray start --head` or pass the head's address", file=sys.stderr)
        return 2
    cpus = ray.cluster_resources().get("CPU", 0)
    wanted = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    if wanted > cpus:
        print(f"error: {ray_cfg.num_workers} workers x {ray_cfg.cpus_per_worker} CPUs = {wanted} CPUs, the "
              f"cluster has {cpus}: lower ray.num_workers or ray.cpus_per_worker", file=sys.stderr)
        return 2
    if ray_cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < ray_cfg.num_workers:
        print(f"error: ray.use_gpu with {ray_cfg.num_workers} workers, the cluster has "
              f"{ray.cluster_resources().get('GPU', 0)} GPUs", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run.dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": asdict(cfg), "deepspeed_json": deepspeed_json(ray_cfg),
                           "collective_timeout_s": ray_cfg.collective_timeout_s,
                           "threads": max(1, int(ray_cfg.cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo",
                                 timeout_s=ray_cfg.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_worker},
                                     placement_strategy=ray_cfg.placement_strategy),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent / f".{run_dir.name}.ray"),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(ray_cfg.cpus_per_worker))),
                                             "TOKENIZERS_PARALLELISM": "false"}}),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the workers' errors; say what happened and where things are
        last = run_dir / "last" / "trainer_state.json"
        where = (f"the last good checkpoint is {run_dir / 'last'} (step "
                 f"{json.loads(last.read_text())['global_step']})" if last.exists() else "no checkpoint was written")
        print(f"error: training failed after {ray_cfg.max_failures} restart(s): {e}\n{where}; "
              f"re-run the same command to resume from it", file=sys.stderr)
        return 1
    print(f"done: {run_dir}/results.json; Ray's record in {result.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
