"""The training loop, written once against `accelerate.Accelerator`.

One process:        distrec train --config configs/train/demo.yaml data.dir=... run.dir=...
accelerate:         accelerate launch --config_file configs/accelerate/X.yaml -m distrec.train --config ...
Resume after a crash: the same command with --resume (model, optimizer, scheduler, RNG and
the position in the epoch come back, so the run continues as if never stopped).

What a run directory may become (every refusal comes before anything is written):
- a new run is marked (`.distrec-output.json`) and records what it trains on (`run.json`:
  the dataset's manifest sha256, its content, its item ids; `--init-from`); `config.yaml`
  is written once the model is built;
- `run.overwrite=true` replaces only a run distrec wrote, and removes only distrec's own
  files of it (`RUN_NAMES`): a folder that is or holds the dataset, or holds anything
  else, is never replaced (`distrec.outputs.check_output`);
- `--resume` continues only on the run's own dataset and model settings (`model.*`,
  `peft.*`, what a step is); a changed `train.*` setting is honoured and said
  ("resuming ... with train.epochs 3 -> 5");
- `--init-from` keeps the earlier run's model settings (a change is refused), needs a
  catalog sharing item ids with it, and says when it shares few;
- a text model needs item text.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm
import yaml
from transformers import get_scheduler

from distrec.atomic import publish_dir, recover_dir, staging_for, write_atomic
from distrec.config import ConfigError, save_config, to_dict
from distrec.data.shards import ShardedSamples
from distrec.formats import DATA_FORMAT
from distrec.models.losses import inclusion_log_q
from distrec.models.peft_methods import METHODS, count_parameters
from distrec.models.run import (RUN_FORMAT, RUN_JSON, build_model, dataset_identity, load_model, model_settings,
                                read_model_json, read_run_record, same_dataset, save_model, settings_differ,
                                trainable_backbone)
from distrec.outputs import MARKER, check_output, mark_output, read_marker, written_by
from distrec.train.config import TrainConfig
from distrec.train.ranking import evaluate

NO_HOOKS = METHODS["frozen"]  # a model without a backbone: no step hooks

# what distrec train writes into a run directory: all that run.overwrite=true removes
RUN_NAMES = ("config.yaml", RUN_JSON, "best", "last", "final", "tokenizer", "tb", "metrics.jsonl", "results.json")
CHECKPOINTS = ("best", "last", "final")  # directories published through a staging copy
# refused on --resume: what a step is (a checkpoint's position in the epoch counts them), and
# what the checkpoint's optimizer and schedule state carry (restored over the config's values)
NOT_ON_RESUME = ("train.batch_size", "train.grad_accum", "train.lr", "train.backbone_lr", "train.weight_decay")
HONOURED_ON_RESUME = ("seed", "data.num_workers", "data.verify")  # besides train.*
FEW_SHARED_ITEMS = 0.5  # --init-from warns below this share of the catalog known to the earlier model
MOSTLY_WITHOUT_TEXT = 0.9  # a text model warns from this share of items without text


def _is_run_file(name: str) -> bool:
    """A name distrec train writes into a run directory (its files, a checkpoint's staging or
    previous copy, an atomic write's temporary file)."""
    if name in RUN_NAMES or name == MARKER:
        return True
    if any(name in (f".{base}.tmp", f".{base}.old") for base in CHECKPOINTS):
        return True
    return any(name.startswith(f".{base}.tmp-") for base in (*RUN_NAMES, MARKER))


def _clear_run(run_dir: Path) -> None:
    """run.overwrite=true: remove distrec's own files of the earlier run (the marker stays until
    it is rewritten: a kill in between leaves a directory still known as a run); the user's
    files stay."""
    for entry in run_dir.iterdir():
        if entry.name == MARKER or not _is_run_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _say(line: str) -> None:
    """One line on stderr, from the first process of a launch only."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_config(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


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
        # emulated bf16 (pre-Ampere GPUs) counts as unsupported: it is slower than fp16 there
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
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


def _fill_deepspeed(plugin, cfg: TrainConfig, world: int, model, precision: str = "no") -> None:
    """Fill the DeepSpeed config's "auto" values accelerate cannot fill itself (it takes them
    from a prepared DataLoader and an HF model's config; distrec has neither) and refuse what
    distrec cannot honour.

    Mixed precision runs as DeepSpeed's `torch_autocast` (fp32 master weights, products in
    bf16/fp16 inside the engine's forward), never as its `bf16`/`fp16` modes: those cast the
    model's parameters (and, in DeepSpeed 0.19.0-0.19.1, its buffers) to 16 bits, after which
    distrec's fp32 pieces outside the engine's forward failed at the first step or validation
    (the pooled-cache write, the projection of fp32 rows, the catalog table into the user
    tower). A JSON asking for `bf16.enabled: true` gets the same, as torch_autocast."""
    conf = plugin.deepspeed_config
    asked = {dtype for dtype in ("bf16", "fp16") if str((conf.get(dtype) or {}).get("enabled")).lower() == "true"}
    half = precision if precision in ("bf16", "fp16") else (sorted(asked)[0] if asked else None)
    conf["bf16"], conf["fp16"] = {"enabled": False}, {"enabled": False}
    if half:
        conf["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[half]}
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
    unreached = model.unreached_params()
    if unreached and zero.get("stage") == 3:
        # weights no module call gathers (AdaLoRA keeps A, E, B in ParameterDicts, and its
        # regulariser and rank allocation read them outside any forward): ZeRO-3 keeps them
        # whole on every rank (they are small); the backbone's own weights stay partitioned
        zero["stage3_param_persistence_threshold"] = max(int(zero.get("stage3_param_persistence_threshold") or 0),
                                                         max(p.numel() for p in unreached) + 1)


def _offloads_optimizer(plugin) -> bool:
    offload = (plugin.deepspeed_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


class Trainer:
    """One training run: the launcher and DeepSpeed set-up, the model and its PEFT method's hooks,
    checkpoints and resume, validation and trackers. `fit()` runs it."""

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
        self.items = pd.read_parquet(self.data_dir / "items.parquet")
        self.identity = dataset_identity(self.data_dir, self.items)
        self.warnings: list[str] = []  # said on stderr and kept in results.json
        self.init_from, self.init_record, self.resume_changes = init_from, None, []
        # every refusal before anything is written: the run directory stays as it was
        self._check_run_dir(init_from)
        self._check_init_from(init_from)
        self._check_item_text()
        on_gpu = torch.cuda.is_available()
        _check_launch(on_gpu)
        self.deepspeed = deepspeed_plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        self.precision = mixed_precision(cfg.train.mixed_precision)
        # DDP would re-send the buffers (the catalog's tokens and pooled cache: GBs at catalog scale)
        # from rank 0 on every forward; they are kept equal on every rank by _share_live_rows
        handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # gloo on CPU (no NCCL there); DISTREC_DIST_TIMEOUT short in tests so a hang fails fast
            handlers.append(InitProcessGroupKwargs(
                backend="nccl" if on_gpu else "gloo",
                timeout=timedelta(seconds=int(os.environ.get("DISTREC_DIST_TIMEOUT", 1800)))))
        self.accelerator = Accelerator(
            # without a GPU: cpu=True makes a multi-process launch one gloo DDP world (accelerate's
            # own CPU launch modes start a single process); DeepSpeed must not get it (it would be
            # dropped). Under DeepSpeed mixed precision is its torch_autocast (_fill_deepspeed)
            cpu=not on_gpu and not self.deepspeed, deepspeed_plugin=deepspeed_plugin,
            mixed_precision="no" if self.deepspeed else self.precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=cfg.trackers or None, project_dir=str(self.run_dir), kwargs_handlers=handlers)
        set_seed(cfg.seed)
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
        if trainable == 0:  # the popularity and content baselines: nothing to optimise, evaluate as is
            if plugin is not None:
                raise ConfigError(f"model.item_repr={cfg.model.item_repr} has nothing to train: run it without DeepSpeed")
            self.wrapped, self.optimizer, self.scheduler = acc.prepare(self.model), None, None
        else:
            self._set_objective(torch.tensor(self.items["train_count"].to_numpy()),
                                cfg.train.batch_size * cfg.model.max_len)
            if plugin is not None:
                _fill_deepspeed(plugin, cfg, acc.num_processes, self.model, self.precision)
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
            self._zero3_unreached = plugin is not None and plugin.zero_stage == 3 and bool(self.model.unreached_params())
            if self._zero3_unreached:
                persistent = [p for p in self.model.unreached_params() if getattr(p, "ds_persist", False)]
                persistent[0].all_gather(persistent)  # persistent weights are gathered at first use: these have none
        self.model = acc.unwrap_model(self.wrapped)
        self.state = TrainerState()
        self.learns_text = trainable_backbone(self.model)

    def _set_objective(self, counts: torch.Tensor, positions: int) -> None:
        o, t = self.model.objective, self.cfg.train
        o.kind, o.num_negatives, o.bce_negatives, o.pos_weight = t.loss, t.num_negatives, t.bce_negatives, t.pos_weight
        o.log_q = inclusion_log_q(counts, positions, t.num_negatives).to(self.accelerator.device)

    # -- what the run directory may become (nothing written here but a checkpoint's recovery)
    def _warn(self, line: str) -> None:
        self.warnings.append(line)
        _say(f"warning: {line}")

    def _has_checkpoint(self) -> bool:
        """last/ whole, or its previous copy left by a kill between publish_dir's two renames."""
        return any((self.run_dir / name / "trainer_state.json").is_file() for name in ("last", ".last.old"))

    def _unmarked_checkpoint(self) -> bool:
        """A directory holding only a checkpoint distrec wrote but no marker: what a Ray worker
        on a node without the shared run directory restores its checkpoint into."""
        run = self.run_dir
        if not run.is_dir() or read_marker(run) is not None or written_by(run) is not None:
            return False
        names = [entry.name for entry in run.iterdir()]
        return (bool(names) and all(map(_is_run_file, names))
                and any(n in names for n in ("last", ".last.tmp", ".last.old")))

    def _check_run_dir(self, init_from) -> None:
        cfg, run = self.cfg, self.run_dir
        inputs = [self.data_dir, init_from]
        if self._unmarked_checkpoint():
            target = run.resolve()
            for given in filter(None, inputs):
                if target == Path(given).resolve() or target in Path(given).resolve().parents:
                    raise ConfigError(f"run.dir={run}: is or holds the input {given} of this train; distrec never "
                                      "writes over its inputs: choose another run.dir")
            existed = True
        else:
            # refuses an input, a folder holding one, the cwd, and a folder distrec train did not write
            existed = check_output(run, "train", inputs=inputs, flag="run.overwrite=true", overwrite=None)
        self.replace = False
        if self.resume:
            if not existed:
                raise ConfigError(f"--resume: run.dir={run} holds no run, so no checkpoint to resume from; "
                                  "drop --resume to start it")
            if not self._has_checkpoint():
                raise ConfigError(f"--resume: run.dir={run} has no checkpoint yet (the first run stopped before one "
                                  "was saved); start afresh with run.overwrite=true (without --resume)")
            self._check_same_run()
            for name in ("last", "best"):  # a kill between a checkpoint's two renames
                recover_dir(run / name)
        elif existed and not cfg.run.overwrite:
            if self._has_checkpoint():
                raise ConfigError(f"run.dir={run} already holds a run; pass --resume to continue it, or "
                                  "run.overwrite=true to start afresh (or choose another run.dir)")
            raise ConfigError(f"run.dir={run} already holds a run that stopped before its first checkpoint (nothing "
                              "to resume); pass run.overwrite=true to start afresh (or choose another run.dir)")
        else:
            self.replace = existed

    def _check_same_run(self) -> None:
        """--resume: the run's own dataset and model settings, or a one-line refusal naming both."""
        run, cfg, now = self.run_dir, self.cfg, self.identity
        record = read_run_record(run) or {}
        old_cfg = _read_config(run / "config.yaml")
        try:
            best = read_model_json(run / "best")
        except ConfigError:
            best = None
        old_ids = [str(i) for i in best["item_ids"]] if best else None
        new_ids = self.items["item_id"].astype(str).tolist()
        old_dir = (record.get("data") or {}).get("dir") or ((old_cfg or {}).get("data") or {}).get("dir")
        if record.get("data"):
            same = same_dataset(record["data"], now)
            recorded = record["data"].get("manifest_sha256", "?")
            detail = f"manifest sha256 {recorded[:12]} vs {now['manifest_sha256'][:12]}"
        else:  # a run written before run.json: its checkpoint's catalog
            same = old_ids is None or old_ids == new_ids
            detail = "another catalog"
        if not same:
            if old_ids is not None and old_ids != new_ids:
                shared = len(set(old_ids) & set(new_ids))
                detail += (f"; the same {len(new_ids)} items in another order" if sorted(old_ids) == sorted(new_ids)
                           else f"; {len(old_ids)} items there, {len(new_ids)} here, {shared} in both")
            if old_dir and Path(old_dir).resolve() == self.data_dir.resolve():
                raise ConfigError(f"--resume: data.dir={self.data_dir} has changed since run.dir={run} was trained "
                                  f"on it ({detail}; prepared again?): a checkpoint continues only on its own dataset: "
                                  "start a new run (another run.dir, or run.overwrite=true)")
            raise ConfigError(f"--resume: data.dir={self.data_dir} is not the dataset run.dir={run} was trained on "
                              f"({old_dir or 'another dataset'}; {detail}): resume with "
                              f"data.dir={old_dir or 'that one'}, "
                              "or start a new run (another run.dir, or run.overwrite=true)")
        new = _flat(to_dict(cfg))
        if old_cfg is not None:
            old = _flat(old_cfg)
            old_model = model_settings(old_cfg.get("model"), old_cfg.get("peft"))
        elif best is not None:
            old, old_model = {}, model_settings(best["model"], best["peft"])
        else:
            return
        changed = settings_differ(old_model, model_settings(to_dict(cfg.model), to_dict(cfg.peft)))
        changed += settings_differ({k: old[k] for k in NOT_ON_RESUME if k in old}, new)
        if changed:
            raise ConfigError(f"--resume: run.dir={run} was trained with other settings than this config "
                              f"({', '.join(changed)}): its checkpoint continues only with its own model, step and "
                              "optimizer settings: resume with them, or start a new run (another run.dir, or "
                              "run.overwrite=true)")
        honoured = {k: v for k, v in old.items() if (k.startswith("train.") or k in HONOURED_ON_RESUME)
                    and k not in NOT_ON_RESUME}
        self.resume_changes = settings_differ(honoured, new)

    def _check_init_from(self, init_from) -> None:
        """--init-from: the earlier run's model settings (a changed one is refused: the model
        would not be what config.yaml says), and a catalog sharing item ids with it."""
        if init_from is None:
            return
        meta = read_model_json(Path(init_from) / "best")  # fails clearly before any work
        cfg = self.cfg
        changed = settings_differ(model_settings(meta["model"], meta["peft"]),
                                  model_settings(to_dict(cfg.model), to_dict(cfg.peft)))
        if changed:
            raise ConfigError(f"--init-from {init_from}: this config changes the settings its model was trained with "
                              f"({', '.join(changed)}); a continued model keeps them: set them as in "
                              f"{Path(init_from) / 'config.yaml'}, or train afresh without --init-from")
        known = {str(i) for i in meta["item_ids"]}
        new_ids = self.items["item_id"].astype(str)
        shared = int(new_ids.isin(known).sum())
        if shared == 0:
            raise ConfigError(f"--init-from {init_from}: its model ({len(known)} items) shares no item id with "
                              f"data.dir={self.data_dir} ({len(new_ids)} items): is this the dataset it was trained "
                              "for? train afresh without --init-from")
        share = shared / len(new_ids)
        self.init_record = {"run": str(Path(init_from).resolve()), "shared_items": shared,
                            "catalog_items": len(new_ids), "model_items": len(known), "share": round(share, 4)}
        if share < FEW_SHARED_ITEMS:
            start = ("from their text alone" if cfg.model.item_repr in ("text", "text+id")
                     else "untrained (ID vectors at zero)")
            self._warn(f"--init-from {init_from}: only {shared} of the {len(new_ids)} items of "
                       f"data.dir={self.data_dir} ({share:.0%}) are known to its model; the other {len(new_ids) - shared} start {start}")

    def _check_item_text(self) -> None:
        """A text model on items without text ranks them by nothing: tied scores as results."""
        repr_ = self.cfg.model.item_repr
        if repr_ not in ("text", "text+id", "content"):
            return
        texts = self.items["text"].fillna("").astype(str).str.strip() if "text" in self.items else None
        empty = 1.0 if texts is None or len(texts) == 0 else float((texts == "").mean())
        if empty == 1.0:
            raise ConfigError(f"data.dir={self.data_dir} has no item text (prepared without --items): train "
                              "item_repr=id, or prepare with --items CATALOG")
        if empty >= MOSTLY_WITHOUT_TEXT:
            self._warn(f"data.dir={self.data_dir}: {empty:.0%} of the {len(texts)} items have no text (prepared "
                       f"without a full catalog?): model.item_repr={repr_} has nothing to tell those apart; train "
                       "item_repr=id, or prepare with --items CATALOG")

    # -- writing the run directory (once every check passed and the model is built) -------
    def _create_run(self) -> None:
        """Main process, a new run: replace distrec's own files of an earlier one
        (run.overwrite=true), mark the directory, record what the run trains on, its config."""
        cfg, run = self.cfg, self.run_dir
        if self.replace:
            _clear_run(run)
        run.mkdir(parents=True, exist_ok=True)
        self._mark()
        write_atomic(run / RUN_JSON, json.dumps({"format": RUN_FORMAT, "data": self.identity,
                                                  "init_from": self.init_record}, indent=2) + "\n")
        save_config(cfg, run / "config.yaml")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(run / "tokenizer"))

    def _mark(self) -> None:
        mark_output(self.run_dir, "train", {"data_dir": self.identity["dir"],
                                            "manifest_sha256": self.identity["manifest_sha256"],
                                            "init_from": None if self.init_from is None
                                            else str(Path(self.init_from).resolve())})

    def _resumed(self) -> None:
        """After the checkpoint loaded: the honoured train.* changes take effect and are said;
        config.yaml then describes the run as it continues."""
        s, t, run = self.state, self.cfg.train, self.run_dir
        # done again from this config: more epochs continue a finished run, fewer end it
        s.done = s.global_step >= self.total_steps or bool(t.patience and s.bad_evals >= t.patience)
        if not s.done and s.step_in_epoch >= len(self.dataset):  # a run that ended on an epoch's last step
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
        if not self.accelerator.is_main_process:
            return
        self._trim_metrics(s.global_step)
        if read_marker(run) is None:  # a run written before the marker
            self._mark()
        if read_run_record(run) is None:
            write_atomic(run / RUN_JSON, json.dumps({"format": RUN_FORMAT, "data": self.identity,
                                                      "init_from": self.init_record}, indent=2) + "\n")
        save_config(self.cfg, run / "config.yaml")
        if self.tokenizer is not None and not (run / "tokenizer").exists():
            self.tokenizer.save_pretrained(str(run / "tokenizer"))
        if self.resume_changes:
            _say(f"resuming {run} at step {s.global_step} with {', '.join(self.resume_changes)}")

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
            self._stop_here("checkpoint")
            publish_dir(staging, last)
        acc.wait_for_everyone()

    def _save_best(self) -> None:
        state = self.accelerator.get_state_dict(self.wrapped)  # gathers ZeRO-3 shards
        if self.accelerator.is_main_process:
            save_model(self.model, self.run_dir / "best", self.cfg.peft, list(self.items["item_id"]), state)
        self.accelerator.wait_for_everyone()

    # -- evaluation ----------------------------------------------------------------------
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
        self._stop_here("validated")
        self._save_last()
        if self.on_checkpoint is not None:
            self.on_checkpoint({"step": s.global_step, "epoch": s.epoch, **{f"valid/{k}": v for k, v in metrics.items()}})
        crash = os.environ.get("DISTREC_CRASH_AFTER_STEP")  # fault injection for the resume tests
        if crash and not self.resume and s.global_step >= int(crash):
            os.kill(os.getpid(), signal.SIGKILL)

    def _stop_here(self, phase: str) -> None:
        """Fault injection for the kill tests, by training progress (not by the clock):
        DISTREC_STOP_AT=STEP:PHASE makes this process SIGSTOP itself, once, for the test to
        SIGKILL it, at the first PHASE at or after optimizer step STEP: `step` (the step
        done), `validated` (validation done and best/ saved, last/ not yet), `checkpoint`
        (last/ written to its staging directory, not yet published)."""
        spec = os.environ.get("DISTREC_STOP_AT")
        if not spec or getattr(self, "_stopped", False):
            return
        step, _, where = spec.partition(":")
        if where == phase and self.state.global_step >= int(step):
            self._stopped = True
            os.kill(os.getpid(), signal.SIGSTOP)

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
            self._create_run()
        acc.wait_for_everyone()
        acc.init_trackers("tb", config={k: str(v) for k, v in asdict(cfg).items()})
        if self.resume:
            try:  # accelerate reads the optimizer, scheduler and RNG files with torch.load(weights_only=True)
                from accelerate.utils import load as weights_only_load

                for rng in (self.run_dir / "last").glob("random_states_*.pkl"):
                    weights_only_load(rng)  # accelerate itself skips an unreadable RNG file: resume would not be exact
                acc.load_state(str(self.run_dir / "last"))
            except pickle.UnpicklingError as e:
                lines = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
                why = lines[0].split(" was not")[0] if lines else "not plain tensors"
                raise ConfigError(f"{self.run_dir / 'last'}: cannot read the resume state, refused without running "
                                  f"it ({why}); distrec did not write these files: train into a new run.dir")
            self.state = s = TrainerState(**json.loads((self.run_dir / "last" / "trainer_state.json").read_text()))
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
                self._stop_here("step")
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
        if getattr(self, "_zero3_unreached", False):
            coordinator = self.wrapped.optimizer.parameter_offload.get_param_coordinator()
            if coordinator.is_complete_trace():
                coordinator._invalidate_trace()

    def _step(self, batch: dict) -> float:
        self._retrace()
        acc, model = self.accelerator, self.model
        history, target = batch["history"].to(acc.device), batch["target"].to(acc.device)
        step = self.state.global_step
        hooks = model.peft if model.uses_text and model.peft is not None else NO_HOOKS  # the PEFT method's step hooks
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
        with self._autocast():
            best.refresh_cache(self.cfg.train.eval_batch_size)
        with torch.no_grad(), self._autocast():
            table = best.item_table().float()
        cold = self.test["cold_target"].to_numpy()
        test = evaluate(best, self.test, table, acc, self.cfg.train.eval_batch_size, {"cold": cold, "warm": ~cold})
        valid = evaluate(best, self.val, table, acc, self.cfg.train.eval_batch_size)["all"]
        results = {
            "valid": valid, "test": test["all"], "test_cold": test["cold"], "test_warm": test["warm"],
            "best_step": self.state.best_step, "steps": self.state.global_step, "epochs": self._epochs_done(),
            "seconds": round(seconds, 1),
            "samples_per_s": round(samples * acc.num_processes / max(session_seconds or seconds, 1e-9), 1),
            "parameters": self.parameters, "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
            "data": {k: self.identity[k] for k in ("dir", "manifest_sha256")}, "init_from": self.init_record,
            "warnings": self.warnings,
        }
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
