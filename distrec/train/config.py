"""The config of `distrec train` (configs/train/*.yaml). `distrec train --help-config` lists it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distrec.config import doc
from distrec.models.config import ModelConfig, PeftConfig
from distrec.models.losses import LOSSES, loss_doc
from distrec.models.ranker import RankerConfig



@dataclass
class DataConfig:
    dir: Optional[str] = doc("a dataset written by distrec prepare", default=None)
    num_workers: int = doc("DataLoader workers per process reading the shards", default=0)
    verify: bool = doc("check shard checksums against the manifest while reading", default=True)


@dataclass
class RunConfig:
    dir: Optional[str] = doc("the run directory (config, checkpoints, metrics, results)", default=None)
    overwrite: bool = doc("start afresh in an existing run directory", default=False)


@dataclass
class LoopConfig:
    loss: str = doc("a registered loss (distrec.models.losses): " + loss_doc(), default="softmax")
    num_negatives: int = doc("sampled_softmax: uniform random negatives per batch", default=256)
    bce_negatives: int = doc("bce: random negatives per positive", default=4)
    pos_weight: float = doc("bce: weight of positives against negatives (imbalanced data)", default=1.0)
    batch_size: int = doc("samples (users) per step per process", default=128)
    grad_accum: int = doc("gradient accumulation steps", default=1)
    lr: float = doc("learning rate of the towers' heads and ID embeddings", default=1e-3)
    backbone_lr: float = doc("learning rate of the backbone's trainable weights (PEFT or full)", default=2e-4)
    weight_decay: float = doc("AdamW weight decay (not on biases, norms, embeddings)", default=0.01)
    warmup_steps: int = doc("linear warm-up steps", default=50)
    schedule: Literal["cosine", "linear", "constant"] = doc("decay after warm-up", default="cosine")
    epochs: int = doc("passes over the training samples (ignored when max_steps > 0)", default=20)
    max_steps: int = doc("optimizer steps to train (0 = use epochs)", default=0)
    clip_grad: float = doc("gradient-norm clipping (0 = off)", default=1.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = doc(
        "auto = bf16 on GPUs that have it (fp16 on older ones), fp32 on CPU (bf16 autocast measured slower there)", default="auto")
    live_items: int = doc("text models: items encoded through the backbone with gradients per step", default=64)
    cache_refresh_steps: int = doc("text models: re-encode the whole catalog every N steps (0 = at validation only)", default=0)
    eval_every: int = doc("validate every N steps (0 = once per epoch)", default=0)
    eval_users: int = doc("validate on a fixed random subset of this many users (0 = all)", default=0)
    test_users: int = doc(
        "test the best checkpoint on a fixed random subset of this many users (0 = all): for a ranker on a CPU, "
        "whose full test belongs to distrec score + evaluate; results.json says how many were read", default=0)
    patience: int = doc("stop after this many validations without a better NDCG@10 (0 = never)", default=5)
    eval_batch_size: int = doc("users per scoring batch in validation and test", default=512)
    log_every: int = doc("log the training loss every N steps", default=20)

    def __post_init__(self):
        LOSSES.check(self.loss, "train.loss")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("train.batch_size, train.grad_accum, train.epochs must be >= 1; train.max_steps >= 0")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("train.lr and train.backbone_lr must be > 0")


@dataclass
class TrainConfig:
    seed: int = doc("seed of weights, negatives, dropout and data order", default=0)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    trackers: list[str] = doc("experiment trackers through accelerate: tensorboard, wandb, mlflow "
                                "(keys only from the environment)", default_factory=lambda: ["tensorboard"])
    progress: bool = doc("show progress bars", default=True)

    def __post_init__(self):
        if self.model.kind == "ranker" and not self.ranker.samples:
            raise ValueError("model.kind=ranker needs ranker.samples: the directory `distrec ranker-data` wrote "
                             "from a retrieval run")
