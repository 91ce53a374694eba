"""The config of `distrec train` (configs/train/*.yaml). `distrec train --help-config` lists it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distrec.models.config import ModelConfig, PeftConfig


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class DataConfig:
    dir: Optional[str] = _help("a dataset written by distrec prepare", default=None)
    num_workers: int = _help("DataLoader workers per process reading the shards", default=0)
    verify: bool = _help("check shard checksums against the manifest while reading", default=True)


@dataclass
class RunConfig:
    dir: Optional[str] = _help("the run directory (config, checkpoints, metrics, results)", default=None)
    overwrite: bool = _help("start afresh in an existing run directory", default=False)


@dataclass
class OptimConfig:
    loss: Literal["softmax", "sampled_softmax", "bce"] = _help(
        "softmax: full softmax over the catalog (cached item vectors); sampled_softmax: in-batch + random "
        "negatives with log-q correction; bce: the seed's pointwise binary cross-entropy", default="softmax")
    num_negatives: int = _help("sampled_softmax: uniform random negatives per batch", default=256)
    bce_negatives: int = _help("bce: random negatives per positive", default=4)
    pos_weight: float = _help("bce: weight of positives against negatives (imbalanced data)", default=1.0)
    batch_size: int = _help("samples (users) per step per process", default=128)
    grad_accum: int = _help("gradient accumulation steps", default=1)
    lr: float = _help("learning rate of the towers' heads and ID embeddings", default=1e-3)
    backbone_lr: float = _help("learning rate of the backbone's trainable weights (PEFT or full)", default=2e-4)
    weight_decay: float = _help("AdamW weight decay (not on biases, norms, embeddings)", default=0.01)
    warmup_steps: int = _help("linear warm-up steps", default=50)
    schedule: Literal["cosine", "linear", "constant"] = _help("decay after warm-up", default="cosine")
    epochs: int = _help("passes over the training samples (ignored when max_steps > 0)", default=20)
    max_steps: int = _help("optimizer steps to train (0 = use epochs)", default=0)
    clip_grad: float = _help("gradient-norm clipping (0 = off)", default=1.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help(
        "auto = bf16 where the hardware has it (recent CPUs and GPUs), else fp32", default="auto")
    live_items: int = _help("text models: items encoded through the backbone with gradients per step", default=64)
    cache_refresh_steps: int = _help("text models: re-encode the whole catalog every N steps (0 = at validation only)", default=0)
    eval_every: int = _help("validate every N steps (0 = once per epoch)", default=0)
    eval_users: int = _help("validate on a fixed random subset of this many users (0 = all)", default=0)
    patience: int = _help("stop after this many validations without a better NDCG@10 (0 = never)", default=5)
    eval_batch_size: int = _help("users per scoring batch in validation and test", default=512)
    log_every: int = _help("log the training loss every N steps", default=20)

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("train.batch_size, train.grad_accum, train.epochs must be >= 1; train.max_steps >= 0")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("train.lr and train.backbone_lr must be > 0")


@dataclass
class TrainConfig:
    seed: int = _help("seed of weights, negatives, dropout and data order", default=0)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    trackers: list[str] = _help("experiment trackers through accelerate: tensorboard, wandb, mlflow "
                                "(keys only from the environment)", default_factory=lambda: ["tensorboard"])
    progress: bool = _help("show progress bars", default=True)
