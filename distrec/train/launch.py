"""The launcher and DeepSpeed side of a training run: the precision, the `Accelerator` (one
process, a DDP world under `accelerate launch`, DeepSpeed from accelerate or Ray), the
DeepSpeed config's "auto" values, the optimizer and schedule, and the ZeRO-3 work-arounds
that the PEFT methods' weights need. The loop (distrec.train.loop) calls these once."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from transformers import get_scheduler

from distrec.config import ConfigError
from distrec.train.config import TrainConfig

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # train.schedule -> HF's


def mixed_precision(choice: str) -> str:
    """'auto' -> bf16 on GPUs that compute it (fp16 on older ones), fp32 on CPU.

    CPU autocast to bf16 was measured slower here even on a CPU with AMX bf16 units
    (BENCHMARKS.md, "bf16 autocast in whole training runs on this CPU"): the casts around many
    small matrices cost more than the faster products save. `train.mixed_precision=bf16`
    still turns it on."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        # emulated bf16 (pre-Ampere GPUs) counts as unsupported: it is slower than fp16 there
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "no"


def uses_deepspeed(deepspeed_plugin) -> bool:
    """DeepSpeed from Ray (a plugin handed in) or from `accelerate launch` (its environment)."""
    return deepspeed_plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def check_launch(on_gpu: bool) -> None:
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


def accelerator(cfg: TrainConfig, run_dir, deepspeed_plugin, precision: str) -> Accelerator:
    """The run's Accelerator: gloo DDP on CPUs, NCCL on GPUs, DeepSpeed when launched with it."""
    on_gpu = torch.cuda.is_available()
    deepspeed = uses_deepspeed(deepspeed_plugin)
    # DDP would re-send the buffers (the catalog's tokens and pooled cache: GBs at catalog scale)
    # from rank 0 on every forward; the loop keeps them equal on every rank (_share_live_rows)
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo on CPU (no NCCL there); DISTREC_DIST_TIMEOUT short in tests so a hang fails fast
        handlers.append(InitProcessGroupKwargs(
            backend="nccl" if on_gpu else "gloo",
            timeout=timedelta(seconds=int(os.environ.get("DISTREC_DIST_TIMEOUT", 1800)))))
    return Accelerator(
        # without a GPU: cpu=True makes a multi-process launch one gloo DDP world (accelerate's
        # own CPU launch modes start a single process); DeepSpeed must not get it (it would be
        # dropped). Under DeepSpeed mixed precision is its torch_autocast (fill_deepspeed)
        cpu=not on_gpu and not deepspeed, deepspeed_plugin=deepspeed_plugin,
        mixed_precision="no" if deepspeed else precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=cfg.trackers or None, project_dir=str(run_dir), kwargs_handlers=handlers)


def param_groups(model, cfg: TrainConfig) -> list[dict]:
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


def fill_deepspeed(plugin, cfg: TrainConfig, world: int, model, precision: str = "no") -> None:
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


def offloads_optimizer(plugin) -> bool:
    offload = (plugin.deepspeed_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def prepare(acc: Accelerator, model, cfg: TrainConfig, total_steps: int, precision: str, plugin=None):
    """(wrapped model, optimizer, scheduler, zero3_unreached) for a model with weights to train:
    the DeepSpeed config filled (`plugin`: the run's DeepSpeed plugin, None without DeepSpeed),
    AdamW (DeepSpeed's CPU Adam under ZeRO-Offload) over the parameter groups, the schedule,
    all through `accelerator.prepare`."""
    if plugin is not None:
        fill_deepspeed(plugin, cfg, acc.num_processes, model, precision)
    if plugin is not None and offloads_optimizer(plugin):
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam (built on first use)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model, cfg), lr=cfg.train.lr, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr)
    scheduler = get_scheduler(SCHEDULES[cfg.train.schedule], optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=total_steps)
    wrapped, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    zero3_unreached = plugin is not None and plugin.zero_stage == 3 and bool(model.unreached_params())
    if zero3_unreached:
        persistent = [p for p in model.unreached_params() if getattr(p, "ds_persist", False)]
        persistent[0].all_gather(persistent)  # persistent weights are gathered at first use: these have none
    return wrapped, optimizer, scheduler, zero3_unreached


def retrace(engine) -> None:
    """AdaLoRA under ZeRO-3 (call only then): the weights it keeps whole make DeepSpeed's
    recorded fetch order (used to prefetch) disagree with later steps, which DeepSpeed 0.19
    treats as an error; keep it recording instead. The cost: no parameter prefetch in these
    runs, which slows ZeRO-3 on GPUs with large backbones (LoRA and adapters keep it)."""
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    if coordinator.is_complete_trace():
        coordinator._invalidate_trace()
