"""The training loop, written once against `accelerate.Accelerator`.

One process:        distrec train --config configs/train/demo.yaml data.dir=... run.dir=...
accelerate:         accelerate launch --config_file configs/accelerate/X.yaml -m distrec.train --config ...
Resume after a crash: the same command with --resume (model, optimizer, scheduler, RNG and
the position in the epoch come back, so the run continues as if never stopped).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_scheduler

from distrec.atomic import publish_dir, recover_dir, staging_for, write_atomic
from distrec.config import ConfigError, save_config
from distrec.data.shards import ShardedSamples
from distrec.models.losses import inclusion_log_q
from distrec.models.peft_methods import adalora_apply_masks, adalora_update_importance, count_parameters
from distrec.models.run import build_model, load_model, read_model_json, save_model, trainable_backbone
from distrec.train.config import TrainConfig
from distrec.train.ranking import evaluate

DATA_FORMAT = "distrec-prepared/1"


@dataclass
class TrainerState:
    """Where training stands; saved beside the resume checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # loader steps done in `epoch`
    global_step: int = 0  # optimizer steps
    best_ndcg: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    done: bool = False
    seconds: float = 0.0  # training wall time over all sessions of the run (resumes add up)


def mixed_precision(choice: str) -> str:
    """'auto' -> bf16 on GPUs that compute it (fp16 on older ones), fp32 on CPU.

    CPU autocast to bf16 was measured slower here even on a CPU with AMX bf16 units: the demo
    model trained at 272 samples/s in bf16 against 366 in fp32 (BENCHMARKS.md, training
    throughput), and 96-step runs at equal quality were slower in bf16 for LoRA (147 against
    201), full fine-tuning (130 against 138) and a frozen backbone (1,057 against 1,326): the
    casts around many small matrices cost more than the faster products save.
    `train.mixed_precision=bf16` still turns it on."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _check_data(data_dir: Path) -> dict:
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"data.dir={data_dir}: not a prepared dataset (no manifest.json); run distrec prepare")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != DATA_FORMAT:
        raise ConfigError(f"data.dir={data_dir}: dataset format {manifest.get('format')!r}, this distrec reads "
                          f"{DATA_FORMAT!r}; prepare the data again with this version")
    if not manifest["shards"]:
        raise ConfigError(f"data.dir={data_dir}: the dataset has no training samples")
    return manifest


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: backbone (its own LR), then decayed / not-decayed head weights."""
    backbone, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            backbone.append(param)
        elif param.ndim < 2 or "embedding" in name or "positions" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if backbone:
        groups.append({"params": backbone, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.backbone_lr})
    return [g for g in groups if g["params"]]


def _check_launch(on_gpu: bool) -> None:
    """A launcher config that cannot work on this machine fails here, not in a hang."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if on_gpu and local > torch.cuda.device_count():
        raise ConfigError(f"{local} processes on this node but {torch.cuda.device_count()} GPU(s): set "
                          "num_processes (accelerate) or ray.num_workers to at most the GPUs per node")
    expected = os.environ.get("DISTREC_EXPECT_WORLD_SIZE")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if expected and int(expected) != world:
        raise ConfigError(f"the launcher started a world of {world} process(es), {expected} expected: check the "
                          "accelerate config (on CPU use configs/accelerate/cpu_*.yaml; `--cpu --num_processes N` "
                          "and MULTI_CPU configs start one process)")


def _fill_deepspeed(plugin, cfg: TrainConfig, world: int, model) -> None:
    """Fill the DeepSpeed config's "auto" values accelerate cannot fill itself (it takes them
    from a prepared DataLoader and an HF model's config; distrec has neither) and refuse what
    distrec cannot honour."""
    conf = plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in conf:
            raise ConfigError(f"the DeepSpeed config has an {section!r} section: distrec brings its own AdamW "
                              "(backbone and head learning rates) and schedule; remove the section")
    t = cfg.train
    conf["train_micro_batch_size_per_gpu"] = t.batch_size
    conf["gradient_accumulation_steps"] = t.grad_accum
    conf["train_batch_size"] = t.batch_size * t.grad_accum * world
    if conf.get("gradient_clipping", "auto") == "auto":
        conf["gradient_clipping"] = t.clip_grad
    hidden = model.backbone.config.hidden_size if model.uses_text else model.cfg.dim
    zero = conf.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden),  # the sizes HF's integration uses
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value
    adalora = model.adalora_dict_params()
    if adalora and zero.get("stage") == 3:
        # AdaLoRA keeps A, E, B in ParameterDicts that no module call gathers, and its
        # regulariser and rank allocation read them outside any forward: ZeRO-3 keeps them
        # whole on every rank (they are small); the backbone's own weights stay partitioned
        zero["stage3_param_persistence_threshold"] = max(int(zero.get("stage3_param_persistence_threshold") or 0),
                                                         max(p.numel() for p in adalora) + 1)


def _offloads_optimizer(plugin) -> bool:
    offload = (plugin.deepspeed_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, init_from: str | None = None,
                 deepspeed_plugin=None, on_checkpoint=None):
        """`deepspeed_plugin`: DeepSpeed without `accelerate launch` (Ray workers). `on_checkpoint(record)`
        is called on every rank after each checkpoint (Ray reports it to its controller)."""
        self.on_checkpoint = on_checkpoint
        if cfg.data.dir is None or cfg.run.dir is None:
            raise ConfigError("data.dir and run.dir are required (e.g. data.dir=data/ml-1m run.dir=runs/x)")
        self.cfg, self.resume = cfg, resume
        self.data_dir, self.run_dir = Path(cfg.data.dir), Path(cfg.run.dir)
        self.manifest = _check_data(self.data_dir)
        self._check_run_dir(init_from)
        on_gpu = torch.cuda.is_available()
        _check_launch(on_gpu)
        self.deepspeed = deepspeed_plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        handlers = []
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # gloo on CPU (no NCCL there); DISTREC_DIST_TIMEOUT short in tests so a hang fails fast
            handlers.append(InitProcessGroupKwargs(
                backend="nccl" if on_gpu else "gloo",
                timeout=timedelta(seconds=int(os.environ.get("DISTREC_DIST_TIMEOUT", 1800)))))
        self.accelerator = Accelerator(
            # without a GPU: cpu=True makes a multi-process launch one gloo DDP world (accelerate's
            # own CPU launch modes start a single process); DeepSpeed must not get it (it would be
            # dropped) and runs fp32 on CPU
            cpu=not on_gpu and not self.deepspeed, deepspeed_plugin=deepspeed_plugin,
            mixed_precision="no" if self.deepspeed and not on_gpu else mixed_precision(cfg.train.mixed_precision),
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=cfg.trackers or None, project_dir=str(self.run_dir), kwargs_handlers=handlers)
        set_seed(cfg.seed)
        self.items = pd.read_parquet(self.data_dir / "items.parquet")
        self.val = pd.read_parquet(self.data_dir / "val.parquet")
        self.test = pd.read_parquet(self.data_dir / "test.parquet")
        if cfg.train.eval_users and len(self.val) > cfg.train.eval_users:
            self.val = self.val.sample(cfg.train.eval_users, random_state=cfg.seed).sort_index()
        acc = self.accelerator
        self.dataset = ShardedSamples(self.data_dir, cfg.train.batch_size, acc.process_index, acc.num_processes,
                                      seed=cfg.seed, max_history=cfg.model.max_len, verify=cfg.data.verify)
        steps_per_epoch = len(self.dataset) // cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * max(steps_per_epoch, 1)
        self.model, self.tokenizer = self._model(init_from)
        trainable, total = count_parameters(self.model)
        self.parameters = {"trainable": trainable, "total": total,
                           "backbone_trainable": count_parameters(self.model.backbone)[0] if self.model.uses_text else 0}
        plugin = acc.state.deepspeed_plugin if self.deepspeed else None
        if trainable == 0:  # the popularity baseline: nothing to optimise, evaluate as is
            if plugin is not None:
                raise ConfigError("model.item_repr=popularity has nothing to train: run it without DeepSpeed")
            self.wrapped, self.optimizer, self.scheduler = acc.prepare(self.model), None, None
        else:
            self._set_objective(torch.tensor(self.items["train_count"].to_numpy()),
                                cfg.train.batch_size * cfg.model.max_len)
            if plugin is not None:
                _fill_deepspeed(plugin, cfg, acc.num_processes, self.model)
            if plugin is not None and _offloads_optimizer(plugin):
                # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam (built on first use)
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(_param_groups(self.model, cfg), lr=cfg.train.lr, adamw_mode=True)
            else:
                optimizer = torch.optim.AdamW(_param_groups(self.model, cfg), lr=cfg.train.lr)
            scheduler = get_scheduler({"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
                cfg.train.schedule], optimizer, num_warmup_steps=cfg.train.warmup_steps,
                num_training_steps=self.total_steps)
            self.wrapped, self.optimizer, self.scheduler = acc.prepare(self.model, optimizer, scheduler)
            self._zero3_adalora = plugin is not None and plugin.zero_stage == 3 and bool(self.model.adalora_dict_params())
            if self._zero3_adalora:
                persistent = [p for p in self.model.adalora_dict_params() if getattr(p, "ds_persist", False)]
                persistent[0].all_gather(persistent)  # persistent weights are gathered at first use: these have none
        self.model = acc.unwrap_model(self.wrapped)
        self.state = TrainerState()
        self.learns_text = trainable_backbone(self.model)

    def _set_objective(self, counts: torch.Tensor, positions: int) -> None:
        o, t = self.model.objective, self.cfg.train
        o.kind, o.num_negatives, o.bce_negatives, o.pos_weight = t.loss, t.num_negatives, t.bce_negatives, t.pos_weight
        o.log_q = inclusion_log_q(counts, positions, t.num_negatives).to(self.accelerator.device)

    def _check_run_dir(self, init_from):
        if self.resume:
            for name in ("last", "best"):  # a kill between a checkpoint's two renames
                recover_dir(self.run_dir / name)
            if not (self.run_dir / "last" / "trainer_state.json").is_file():
                raise ConfigError(f"--resume: {self.run_dir} has no checkpoint to resume from (last/trainer_state.json)")
        elif (self.run_dir / "config.yaml").exists() and not self.cfg.run.overwrite:
            raise ConfigError(f"run.dir={self.run_dir} already holds a run; pass --resume to continue it "
                              "or run.overwrite=true to start afresh")
        if init_from is not None:
            read_model_json(Path(init_from) / "best")  # fails clearly before any work

    def _model(self, init_from):
        cfg = self.cfg
        if init_from is None:
            return build_model(cfg.model, cfg.peft, self.items, self.total_steps)
        # continue fine-tuning an earlier run; new items start from their text
        model = load_model(Path(init_from) / "best", self.items, Path(init_from) / "tokenizer")
        return model, getattr(model, "tokenizer", None)

    # -- checkpoints ---------------------------------------------------------------------
    def _save_last(self) -> None:
        acc = self.accelerator
        last = self.run_dir / "last"
        staging = staging_for(last)
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        acc.wait_for_everyone()
        staging.mkdir(parents=True, exist_ok=True)  # every rank writes into it (its RNG state, ZeRO shards)
        acc.save_state(str(staging), safe_serialization=True)
        acc.wait_for_everyone()  # every rank's files are in before the directory is published
        if acc.is_main_process:
            (staging / "trainer_state.json").write_text(json.dumps(asdict(self.state)))
            publish_dir(staging, last)
        acc.wait_for_everyone()

    def _save_best(self) -> None:
        state = self.accelerator.get_state_dict(self.wrapped)  # gathers ZeRO-3 shards
        if self.accelerator.is_main_process:
            save_model(self.model, self.run_dir / "best", self.cfg.peft, list(self.items["item_id"]), state)
        self.accelerator.wait_for_everyone()

    # -- evaluation ----------------------------------------------------------------------
    def _table(self) -> torch.Tensor:
        if self.learns_text or (self.model.uses_text and self.state.global_step == 0):
            self.model.refresh_cache(self.cfg.train.eval_batch_size)
        with torch.no_grad(), self.accelerator.autocast():
            return self.model.item_table().float()

    def _validate(self) -> dict:
        self._retrace()
        self.model.eval()
        metrics = evaluate(self.model, self.val, self._table(), self.accelerator, self.cfg.train.eval_batch_size)["all"]
        self.model.train()
        return metrics

    def _trim_metrics(self, step: int) -> None:
        """On resume: forget what was logged after the checkpoint (those steps run again) and
        a line cut short by the kill, so metrics.jsonl reads as one uninterrupted run."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_atomic(path, "".join(f"{line}\n" for line in kept))

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(numeric, step=record.get("step", self.state.global_step))

    def _after_validation(self, metrics: dict, started: float) -> None:
        s, cfg = self.state, self.cfg.train
        s.seconds = self._seconds_before + time.perf_counter() - started
        self._log({"event": "valid", "step": s.global_step, "epoch": s.epoch,
                   "seconds": round(time.perf_counter() - started, 1),
                   **{f"valid/{k}": v for k, v in metrics.items() if k != "users"}})
        if metrics["ndcg@10"] > s.best_ndcg:
            s.best_ndcg, s.best_step, s.bad_evals = metrics["ndcg@10"], s.global_step, 0
            self._save_best()
        else:
            s.bad_evals += 1
            if cfg.patience and s.bad_evals >= cfg.patience:
                s.done = True
        if s.global_step >= self.total_steps:
            s.done = True
        self._save_last()
        if self.on_checkpoint is not None:
            self.on_checkpoint({"step": s.global_step, "epoch": s.epoch, **{f"valid/{k}": v for k, v in metrics.items()}})
        crash = os.environ.get("DISTREC_CRASH_AFTER_STEP")  # fault injection for the resume tests
        if crash and not self.resume and s.global_step >= int(crash):
            os.kill(os.getpid(), signal.SIGKILL)

    # -- the loop ------------------------------------------------------------------------
    def _live_items(self, target: torch.Tensor) -> torch.Tensor:
        """Items encoded through the backbone this step: the batch's targets, then random fill."""
        budget = self.cfg.train.live_items
        unique = torch.unique(target)
        if len(unique) > budget:
            unique = unique[torch.randperm(len(unique), device=unique.device)[:budget]]
        fill = budget - len(unique)
        if fill > 0:
            unique = torch.unique(torch.cat([unique, torch.randint(0, self.model.num_items, (fill,), device=unique.device)]))
        return unique

    def fit(self) -> dict:
        acc, cfg, s = self.accelerator, self.cfg, self.state
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                for stale in ("metrics.jsonl", "results.json"):
                    (self.run_dir / stale).unlink(missing_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        acc.init_trackers("tb", config={k: str(v) for k, v in asdict(cfg).items()})
        if self.resume:
            acc.load_state(str(self.run_dir / "last"))
            self.state = s = TrainerState(**json.loads((self.run_dir / "last" / "trainer_state.json").read_text()))
            if acc.is_main_process:
                self._trim_metrics(s.global_step)
        self._log({"event": "start", "step": s.global_step, "world_size": acc.num_processes,
                   "distributed": str(acc.distributed_type).rsplit(".", 1)[-1],
                   "zero_stage": acc.state.deepspeed_plugin.zero_stage if self.deepspeed else None,
                   "mixed_precision": acc.mixed_precision, "total_steps": self.total_steps,
                   "steps_per_epoch": len(self.dataset), **{f"params/{k}": v for k, v in self.parameters.items()}})
        if self.model.uses_text:
            self.model.refresh_cache(cfg.train.eval_batch_size)
        started = time.perf_counter()
        self._seconds_before = s.seconds
        if self.optimizer is None:
            self._save_best()
            return self._finish(0.0, 0)
        bar = tqdm(total=self.total_steps, initial=s.global_step, desc="train", disable=not (cfg.progress and acc.is_main_process))
        samples, window_loss, window_steps = 0, 0.0, 0
        while not s.done:
            self.dataset.set_epoch(s.epoch, s.step_in_epoch)
            # its own generator: a loader's iterator draws a seed from the one it is given, and
            # from the global RNG (dropout's) by default; a mid-epoch resume would then shift
            # every later dropout mask against the uninterrupted run
            loader = DataLoader(self.dataset, batch_size=None, num_workers=cfg.data.num_workers,
                                generator=torch.Generator().manual_seed(cfg.seed * 1000 + s.epoch))
            for batch in loader:
                loss = self._step(batch)
                samples += len(batch["keys"])
                window_loss, window_steps = window_loss + loss, window_steps + 1
                s.step_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                s.global_step += 1
                bar.update(1)
                if s.global_step % cfg.train.log_every == 0:
                    elapsed = time.perf_counter() - started
                    # the mean over ranks: what one process with the whole global batch would report
                    window = float(acc.reduce(torch.tensor(window_loss / window_steps, device=acc.device), "mean"))
                    self._log({"event": "train", "step": s.global_step, "loss": window,
                               "lr": self.scheduler.get_last_lr()[0], "samples_per_s": samples * acc.num_processes / elapsed})
                    bar.set_postfix(loss=f"{window:.4f}")
                    window_loss, window_steps = 0.0, 0
                if self.learns_text and cfg.train.cache_refresh_steps and s.global_step % cfg.train.cache_refresh_steps == 0:
                    self.model.refresh_cache(cfg.train.eval_batch_size)
                if (cfg.train.eval_every and s.global_step % cfg.train.eval_every == 0) or s.global_step >= self.total_steps:
                    self._after_validation(self._validate(), started)
                if s.done:
                    break
            if not s.done:
                s.epoch, s.step_in_epoch = s.epoch + 1, 0
                if not cfg.train.eval_every:
                    self._after_validation(self._validate(), started)
        bar.close()
        return self._finish(self._seconds_before + time.perf_counter() - started, samples,
                            time.perf_counter() - started)

    def _retrace(self) -> None:
        """AdaLoRA under ZeRO-3: the weights it keeps whole make DeepSpeed's recorded fetch
        order (used to prefetch) disagree with later steps, which DeepSpeed 0.19 treats as an
        error; keep it recording instead. The cost: no parameter prefetch in these runs, which
        slows ZeRO-3 on GPUs with large backbones (LoRA and adapters keep it)."""
        if getattr(self, "_zero3_adalora", False):
            coordinator = self.wrapped.optimizer.parameter_offload.get_param_coordinator()
            if coordinator.is_complete_trace():
                coordinator._invalidate_trace()

    def _step(self, batch: dict) -> float:
        self._retrace()
        acc, model = self.accelerator, self.model
        history, target = batch["history"].to(acc.device), batch["target"].to(acc.device)
        step = self.state.global_step
        with acc.accumulate(self.wrapped):
            live = self._live_items(target) if self.learns_text else None
            with acc.autocast():
                loss, live_pooled, regulariser = self.wrapped(history, target, live)
            if self.deepspeed:
                # the engine directly (accelerate's backward also steps): AdaLoRA must read the
                # gradients between backward and step, and mask the fp32 master after it
                from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param

                engine = self.wrapped
                self._retrace()
                engine.backward(loss + regulariser)
                boundary = engine.is_gradient_accumulation_boundary()
                if boundary and model.uses_text:
                    adalora_update_importance(model.backbone, step, safe_get_full_grad)
                engine.step()  # clips (config gradient_clipping), steps the optimizer and the schedule
                if boundary and model.uses_text:
                    adalora_apply_masks(model.backbone, step, safe_set_full_fp32_param)
            else:
                acc.backward(loss + regulariser)
                if acc.sync_gradients:
                    if self.cfg.train.clip_grad:
                        acc.clip_grad_norm_(self.wrapped.parameters(), self.cfg.train.clip_grad)
                    if model.uses_text:
                        adalora_update_importance(model.backbone, step)
                self.optimizer.step()
                if acc.sync_gradients and model.uses_text:
                    adalora_apply_masks(model.backbone, step)
                self.scheduler.step()
                self.optimizer.zero_grad()
        if live is not None:
            model.pooled_cache[live] = live_pooled.detach().float()
        return float(loss.detach())

    def _finish(self, seconds: float, samples: int, session_seconds: float | None = None) -> dict:
        """Test the best checkpoint once (PROTOCOL: the test split is read once per run)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        best = load_model(self.run_dir / "best", self.items, self.run_dir / "tokenizer").to(acc.device)
        best.eval()
        best.refresh_cache(self.cfg.train.eval_batch_size)
        with torch.no_grad(), acc.autocast():
            table = best.item_table().float()
        cold = self.test["cold_target"].to_numpy()
        test = evaluate(best, self.test, table, acc, self.cfg.train.eval_batch_size, {"cold": cold, "warm": ~cold})
        valid = evaluate(best, self.val, table, acc, self.cfg.train.eval_batch_size)["all"]
        results = {
            "valid": valid, "test": test["all"], "test_cold": test["cold"], "test_warm": test["warm"],
            "best_step": self.state.best_step, "steps": self.state.global_step, "epochs": self.state.epoch,
            "seconds": round(seconds, 1),
            "samples_per_s": round(samples * acc.num_processes / max(session_seconds or seconds, 1e-9), 1),
            "parameters": self.parameters, "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
        }
        self._log({"event": "test", "step": self.state.global_step,
                   **{f"test/{k}": v for k, v in test["all"].items() if k != "users"}})
        if acc.is_main_process:
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        acc.end_training()
        return results


def train(cfg: TrainConfig, resume: bool = False, init_from: str | None = None, deepspeed_plugin=None,
          on_checkpoint=None) -> dict:
    return Trainer(cfg, resume, init_from, deepspeed_plugin, on_checkpoint).fit()
