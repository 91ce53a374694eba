"""The training loop, written once against `accelerate.Accelerator`.

One process:        distrec train --config configs/train/demo.yaml data.dir=... run.dir=...
accelerate:         accelerate launch --config_file configs/accelerate/X.yaml -m distrec.train --config ...
Resume after a crash: the same command with --resume (model, optimizer, scheduler, RNG and
the position in the epoch come back, so the run continues as if never stopped).

The parts around the loop, one concern each: what the run directory may become
(distrec.train.rundir), checkpoints and resume (distrec.train.checkpoint), the launcher,
DeepSpeed and the optimizer (distrec.train.launch), the PEFT method's step hooks
(distrec.models.peft_methods), the kill tests' fault injection (distrec.train.faults).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from distrec.config import ConfigError
from distrec.data.shards import ShardedSamples
from distrec.models.losses import inclusion_log_q
from distrec.models.peft_methods import METHODS, count_parameters
from distrec.models.run import build_model, load_model, trainable_backbone
from distrec.train import faults, launch
from distrec.train.checkpoint import TrainerState, load_last, save_best, save_last
from distrec.train.config import TrainConfig
from distrec.train.validation import ranker_metrics, split_metrics
from distrec.ranker_data import check_samples
from distrec.atomic import write_atomic
from distrec.train.rundir import RunDirectory

NO_HOOKS = METHODS["frozen"]  # a model without a backbone: no step hooks


class Trainer:
    """One training run: the run directory checked, the launcher and DeepSpeed set up, the model
    built with its PEFT method's hooks, then `fit()`: the loop, validation, checkpoints and
    trackers, and one test of the best checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, init_from: str | None = None,
                 deepspeed_plugin=None, on_checkpoint=None):
        """`deepspeed_plugin`: DeepSpeed without `accelerate launch` (Ray workers). `on_checkpoint(record)`
        is called on every rank after each checkpoint (Ray reports it to its controller)."""
        self.on_checkpoint = on_checkpoint
        self.cfg, self.resume, self.init_from = cfg, resume, init_from
        # every refusal before anything is written: the run directory stays as it was
        self.run = RunDirectory(cfg, resume, init_from)
        self.data_dir, self.run_dir, self.items = self.run.data_dir, self.run.path, self.run.items
        self.faults = faults.from_environment(resumed=resume)
        launch.check_launch(torch.cuda.is_available())
        self.deepspeed = launch.uses_deepspeed(deepspeed_plugin)
        self.precision = launch.mixed_precision(cfg.train.mixed_precision)
        self.accelerator = acc = launch.accelerator(cfg, self.run_dir, deepspeed_plugin, self.precision)
        set_seed(cfg.seed)
        # the ranker (model.kind=ranker) reads its samples, and the validation and test users'
        # retrieval candidates, from `distrec ranker-data`'s directory, made from this dataset
        self.ranker = cfg.model.kind == "ranker"
        samples = Path(cfg.ranker.samples) if self.ranker else self.data_dir
        self.ranker_samples = check_samples(samples, self.data_dir) if self.ranker else None
        self.val = pd.read_parquet(samples / "val.parquet")
        self.test = pd.read_parquet(samples / "test.parquet")
        if cfg.train.eval_users and len(self.val) > cfg.train.eval_users:
            self.val = self.val.sample(cfg.train.eval_users, random_state=cfg.seed).sort_index()
        if cfg.train.test_users and len(self.test) > cfg.train.test_users:
            self.test = self.test.sample(cfg.train.test_users, random_state=cfg.seed).sort_index()
        self.dataset = ShardedSamples(samples, cfg.train.batch_size, acc.process_index, acc.num_processes,
                                      seed=cfg.seed, max_history=cfg.model.max_len, verify=cfg.data.verify)
        steps_per_epoch = len(self.dataset) // cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * max(steps_per_epoch, 1)
        self.model, self.tokenizer = self._model(init_from)
        self._cache_fresh = False
        if getattr(self.model, "needs_fit", False) and not resume:
            # before the optimizer and any engine exist: the fit changes buffers (and with
            # content_init the projection), which a ZeRO engine's fp32 master copy would not see
            self.model.to(acc.device)
            with self._autocast():
                self.model.fit_whitening(cfg.train.eval_batch_size)
            self._cache_fresh = True
        trainable, total = count_parameters(self.model)
        self.parameters = {"trainable": trainable, "total": total,
                           "backbone_trainable": count_parameters(self.model.backbone)[0] if self.model.uses_text else 0}
        plugin = acc.state.deepspeed_plugin if self.deepspeed else None
        self._zero3_unreached = False
        if trainable == 0:  # the popularity and content baselines: nothing to optimise, evaluate as is
            if plugin is not None:
                raise ConfigError(f"model.item_repr={cfg.model.item_repr} has nothing to train: run it without DeepSpeed")
            self.wrapped, self.optimizer, self.scheduler = acc.prepare(self.model), None, None
        else:
            if not self.ranker:
                self._set_objective(torch.tensor(self.items["train_count"].to_numpy()),
                                    cfg.train.batch_size * cfg.model.max_len)
            self.wrapped, self.optimizer, self.scheduler, self._zero3_unreached = launch.prepare(
                acc, self.model, cfg, self.total_steps, self.precision, plugin)
        self.model = acc.unwrap_model(self.wrapped)
        self.state = TrainerState()
        self.learns_text = trainable_backbone(self.model) and not self.ranker  # live items in the item cache

    def _set_objective(self, counts: torch.Tensor, positions: int) -> None:
        o, t = self.model.objective, self.cfg.train
        o.kind, o.num_negatives, o.bce_negatives, o.pos_weight = t.loss, t.num_negatives, t.bce_negatives, t.pos_weight
        o.log_q = inclusion_log_q(counts, positions, t.num_negatives).to(self.accelerator.device)

    def _model(self, init_from):
        cfg = self.cfg
        if init_from is None:
            return build_model(cfg.model, cfg.peft, self.items, self.total_steps, ranker_cfg=cfg.ranker,
                               pos_weight=cfg.train.pos_weight)
        # continue fine-tuning an earlier run; new items start from their text
        model = load_model(Path(init_from) / "best", self.items, Path(init_from) / "tokenizer")
        return model, getattr(model, "tokenizer", None)

    def _retrace(self) -> None:
        if self._zero3_unreached:
            launch.retrace(self.wrapped)

    # -- checkpoints ---------------------------------------------------------------------
    def _save_last(self) -> None:
        save_last(self.accelerator, self.run_dir, self.state,
                  before_publish=lambda: self.faults.reached("checkpoint", self.state.global_step))

    def _save_best(self) -> None:
        save_best(self.accelerator, self.wrapped, self.model, self.run_dir, self.cfg.peft, list(self.items["item_id"]))

    def _resumed(self) -> None:
        """After the checkpoint loaded: the honoured train.* changes take effect (and are said);
        config.yaml then describes the run as it continues."""
        s, t = self.state, self.cfg.train
        # done again from this config: more epochs continue a finished run, fewer end it
        s.done = s.global_step >= self.total_steps or bool(t.patience and s.bad_evals >= t.patience)
        if not s.done and s.step_in_epoch >= len(self.dataset):  # a run that ended on an epoch's last step
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
        if self.accelerator.is_main_process:
            self.run.continued(s.global_step, self.tokenizer)

    # -- evaluation and logs -------------------------------------------------------------
    def _autocast(self):
        """Mixed precision outside the training forward (catalog encoding, validation): the
        whole catalog through the backbone is the dominant cost on a GPU. Under DeepSpeed
        accelerate's autocast does nothing, so torch's own."""
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.accelerator.device.type, dtype=half or torch.float32, enabled=half is not None)

    def _table(self) -> torch.Tensor:
        if self.learns_text or (self.model.uses_text and self.state.global_step == 0):
            with self._autocast():
                self.model.refresh_cache(self.cfg.train.eval_batch_size)
        with torch.no_grad(), self._autocast():
            return self.model.item_table().float()

    def _validate(self) -> dict:
        self._retrace()
        self.model.eval()
        if self.ranker:
            metrics = ranker_metrics(self.model, self.val, self.accelerator, self.cfg.train.eval_batch_size)["all"]
        else:
            metrics = split_metrics(self.model, self.val, self._table(), self.accelerator,
                                    self.cfg.train.eval_batch_size)["all"]
        self.model.train()
        return metrics

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
        self.faults.reached("validated", s.global_step)
        self._save_last()
        if self.on_checkpoint is not None:
            self.on_checkpoint({"step": s.global_step, "epoch": s.epoch, **{f"valid/{k}": v for k, v in metrics.items()}})
        self.faults.reached("checkpointed", s.global_step)

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
        """Train to the end (epochs, max_steps or patience), checkpointing at each validation;
        then test the best checkpoint and write results.json. Returns the results."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        acc.wait_for_everyone()  # every rank's checks read the directory before it changes
        if acc.is_main_process and not self.resume:
            self.run.create(self.tokenizer)
        acc.wait_for_everyone()
        acc.init_trackers("tb", config={k: str(v) for k, v in asdict(cfg).items()})
        if self.resume:
            self.state = s = load_last(acc, self.run_dir)
            self._resumed()
        self._log({"event": "start", "step": s.global_step, "world_size": acc.num_processes,
                   "distributed": str(acc.distributed_type).rsplit(".", 1)[-1],
                   "zero_stage": acc.state.deepspeed_plugin.zero_stage if self.deepspeed else None,
                   "mixed_precision": acc.mixed_precision, "total_steps": self.total_steps,
                   "steps_per_epoch": len(self.dataset), **{f"params/{k}": v for k, v in self.parameters.items()}})
        if self.model.uses_text and not (self._cache_fresh and not self.resume):
            with self._autocast():
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
                self.faults.reached("step", s.global_step)
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

    def _step(self, batch: dict) -> float:
        """One forward and backward; the optimizer step at an accumulation boundary, with the
        PEFT method's hooks around it (AdaLoRA's rank allocation, its masks)."""
        self._retrace()
        acc, model = self.accelerator, self.model
        history, target = batch["history"].to(acc.device), batch["target"].to(acc.device)
        step = self.state.global_step
        hooks = model.peft if model.uses_text and model.peft is not None else NO_HOOKS
        with acc.accumulate(self.wrapped):
            live = self._live_items(target) if self.learns_text else None
            # the ranker reads its candidates and their retrieval scores where the towers read live items
            extra = (batch["candidates"].to(acc.device), batch["scores"].to(acc.device)) if self.ranker else (live,)
            with acc.autocast():
                loss, live_pooled, regulariser = self.wrapped(history, target, *extra)
            if self.deepspeed:
                # the engine directly (accelerate's backward also steps): AdaLoRA must read the
                # gradients between backward and step, and mask the fp32 master after it
                from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param

                engine = self.wrapped
                self._retrace()
                engine.backward(loss + regulariser)
                boundary = engine.is_gradient_accumulation_boundary()
                if boundary and hooks.after_backward:
                    hooks.after_backward(model.backbone, step, safe_get_full_grad)
                engine.step()  # clips (config gradient_clipping), steps the optimizer and the schedule
                if boundary and hooks.after_step:
                    hooks.after_step(model.backbone, step, safe_set_full_fp32_param)
            else:
                acc.backward(loss + regulariser)
                if acc.sync_gradients:
                    if self.cfg.train.clip_grad:
                        acc.clip_grad_norm_(self.wrapped.parameters(), self.cfg.train.clip_grad)
                    if hooks.after_backward:
                        hooks.after_backward(model.backbone, step)
                self.optimizer.step()
                if acc.sync_gradients and hooks.after_step:
                    hooks.after_step(model.backbone, step)
                self.scheduler.step()
                self.optimizer.zero_grad()
        if live is not None:
            self._share_live_rows(live, live_pooled.detach().float())
        return float(loss.detach())

    def _share_live_rows(self, live: torch.Tensor, pooled: torch.Tensor) -> None:
        """Write the step's freshly encoded rows into the pooled cache on every rank, every
        rank's rows: each cache then holds what one process over the global batch would."""
        acc = self.accelerator
        if acc.num_processes > 1:
            live = acc.gather(acc.pad_across_processes(live, pad_index=-1))
            pooled = acc.gather(acc.pad_across_processes(pooled))
            keep = live >= 0
            live, pooled = live[keep], pooled[keep]
        self.model.pooled_cache[live] = pooled.to(self.model.pooled_cache.dtype)

    def _epochs_done(self) -> int | float:
        """Passes over the training samples (the epoch index alone says 0 after one epoch)."""
        done = self.state.epoch + self.state.step_in_epoch / max(len(self.dataset), 1)
        return int(done) if float(done).is_integer() else round(done, 2)

    def _finish(self, seconds: float, samples: int, session_seconds: float | None = None) -> dict:
        """Test the best checkpoint once (PROTOCOL: the test split is read once per run)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        best = load_model(self.run_dir / "best", self.items, self.run_dir / "tokenizer").to(acc.device)
        best.eval()
        cold = self.test["cold_target"].to_numpy()
        slices, size = {"cold": cold, "warm": ~cold}, self.cfg.train.eval_batch_size
        if self.ranker:
            test = ranker_metrics(best, self.test, acc, size, slices)
            valid = ranker_metrics(best, self.val, acc, size)["all"]
        else:
            with self._autocast():
                best.refresh_cache(size)
            with torch.no_grad(), self._autocast():
                table = best.item_table().float()
            test = split_metrics(best, self.test, table, acc, size, slices)
            valid = split_metrics(best, self.val, table, acc, size)["all"]
        results = {
            "valid": valid, "test": test["all"], "test_cold": test["cold"], "test_warm": test["warm"],
            "best_step": self.state.best_step, "steps": self.state.global_step, "epochs": self._epochs_done(),
            "seconds": round(seconds, 1),
            "samples_per_s": round(samples * acc.num_processes / max(session_seconds or seconds, 1e-9), 1),
            "parameters": self.parameters, "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
            "data": {k: self.run.identity[k] for k in ("dir", "manifest_sha256")}, "init_from": self.run.init_record,
            "warnings": self.run.warnings,
        }
        if self.ranker:  # what its candidates came from
            results["ranker"] = {"samples": str(Path(self.cfg.ranker.samples).resolve()),
                                 "retrieval_run": self.ranker_samples["retrieval_run"],
                                 "candidates": self.ranker_samples["candidates"]}
        self._log({"event": "test", "step": self.state.global_step,
                   **{f"test/{k}": v for k, v in test["all"].items() if k != "users"}})
        if acc.is_main_process:
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        acc.end_training()
        return results


def train(cfg: TrainConfig, resume: bool = False, init_from: str | None = None, deepspeed_plugin=None,
          on_checkpoint=None) -> dict:
    """`distrec train`: train `cfg` in `cfg.run.dir` (one process, or each rank under accelerate /
    DeepSpeed / Ray Train), validate, keep the best checkpoint, test it once. `resume`: go on from
    last/ exactly; `init_from`: start from another run's weights. Returns results.json's content."""
    return Trainer(cfg, resume, init_from, deepspeed_plugin, on_checkpoint).fit()
