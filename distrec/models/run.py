"""The run directory: the one place that writes and reads a trained model.

    RUN/.distrec-output.json     the marker: written by distrec train, from which dataset
    RUN/run.json                 what the run was trained on (`dataset_identity`, --init-from)
    RUN/config.yaml              resolved training config (written once the run exists)
    RUN/tokenizer/               the backbone's tokenizer (text models)
    RUN/best/, RUN/final/        a model checkpoint:
        model.json               model + PEFT settings, catalog size, item ids
        heads.safetensors        projection, ID embeddings, user tower
        adapter/                 PEFT adapters (save_pretrained) or Houlsby adapters
        backbone.safetensors     full fine-tuning only
    RUN/last/                    resume state (accelerate save_state) + trainer_state.json
    RUN/metrics.jsonl, RUN/results.json, RUN/tb/

Scoring and evaluation load runs with `load_model`, without importing the training code.
Everything loads with safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distrec.atomic import publish_dir, staging_for
from distrec.config import ConfigError, from_dict
from distrec.models.backbone import load_backbone, pooling_for, tokenize_catalog
from distrec.models.config import ModelConfig, PeftConfig
from distrec.models.peft_methods import METHODS, apply_peft, load_backbone_weights, save_backbone
from distrec.models.ranker import Ranker, RankerConfig
from distrec.models.recommender import Content, Popularity, Recommender
from distrec.outputs import fingerprint_dir, fingerprint_file

HEADS = "heads.safetensors"
MODEL_JSON = "model.json"
RUN_JSON = "run.json"
RUN_FORMAT = "distrec-run/1"
DATA_FILES = ("items.parquet", "users.parquet", "val.parquet", "test.parquet")


def item_ids_sha256(item_ids) -> str:
    return hashlib.sha256("\n".join(map(str, item_ids)).encode()).hexdigest()


def dataset_identity(data_dir: str | Path, items: pd.DataFrame | None = None) -> dict:
    """What a prepared dataset is: its manifest's sha256 (what every stage records), and a
    content sha256 (the shards' recorded checksums and the tables' bytes) under which a
    dataset prepared again from the same input, whose manifest differs only in its timings,
    is still the same dataset."""
    d = Path(data_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    if items is None:
        items = pd.read_parquet(d / "items.parquet", columns=["item_id"])
    content = hashlib.sha256(json.dumps([[s.get("path"), s.get("samples"), s.get("sha256")]
                                         for s in manifest.get("shards", [])]).encode())
    content.update(fingerprint_dir(d, [name for name in DATA_FILES if (d / name).is_file()]).encode())
    return {"dir": str(d.resolve()), "manifest_sha256": fingerprint_file(d / "manifest.json"),
            "content_sha256": content.hexdigest(), "num_items": len(items),
            "item_ids_sha256": item_ids_sha256(items["item_id"])}


def same_dataset(recorded: dict, current: dict) -> bool:
    return (recorded.get("manifest_sha256") == current["manifest_sha256"]
            or recorded.get("content_sha256") == current["content_sha256"])


def read_run_record(run_dir: str | Path) -> dict | None:
    """RUN/run.json (None for runs written before it existed, or an unreadable one)."""
    try:
        record = json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RUN_FORMAT else None


TEXT_ONLY_KEYS = ("model.backbone", "model.pooling", "model.max_text_tokens", "model.backbone_dropout",
                  "model.adaptor_hidden")


def model_settings(model: dict, peft: dict) -> dict:
    """The model.* and peft.* settings a checkpoint's weights depend on, flattened: an ID or
    popularity model has no backbone, so its backbone and PEFT keys do not count;
    `trust_remote_code` is a permission, not a property of the model."""
    flat = {f"model.{k}": v for k, v in (model or {}).items() if k != "trust_remote_code"}
    if flat.get("model.item_repr") in ("id", "popularity"):
        return {k: v for k, v in flat.items() if k not in TEXT_ONLY_KEYS}
    if flat.get("model.item_repr") == "content":  # its backbone is frozen whatever peft.* says
        return flat
    return {**flat, **{f"peft.{k}": v for k, v in (peft or {}).items()}}


def settings_differ(old: dict, new: dict) -> list[str]:
    """'key old -> new' for every key both hold with different values."""
    return [f"{key} {old[key]} -> {new[key]}" for key in sorted(old) if key in new and old[key] != new[key]]


def _tuning(model_cfg: ModelConfig, peft_cfg: PeftConfig) -> PeftConfig:
    """The content baseline trains nothing: its backbone is frozen whatever peft.method says."""
    return PeftConfig(method="frozen") if model_cfg.item_repr == "content" and model_cfg.kind != "ranker" else peft_cfg


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, items: pd.DataFrame, total_steps: int,
                backbone=None, tokenizer=None, ranker_cfg: RankerConfig | None = None, pos_weight: float = 1.0):
    """A fresh Recommender (or, model.kind=ranker, a Ranker) for the catalog `items`
    (items.parquet); (model, tokenizer). `backbone`/`tokenizer` may be given already loaded
    (and already PEFT-wrapped)."""
    if model_cfg.kind == "ranker":
        if backbone is None:
            backbone, tokenizer = load_backbone(model_cfg.backbone, model_cfg.trust_remote_code,
                                                model_cfg.backbone_dropout)
            backbone = apply_peft(backbone, peft_cfg, total_steps)
        pooling = pooling_for(backbone.base_model if hasattr(backbone, "peft_config") else backbone, model_cfg.pooling)
        model = Ranker(ranker_cfg or RankerConfig(), backbone, tokenizer, items["text"].tolist(), len(items), pos_weight,
                       pooling)
        model.model_cfg, model.peft = model_cfg, METHODS[peft_cfg.method]
        return model, tokenizer
    if model_cfg.item_repr == "popularity":
        counts = torch.tensor(items["train_count"].to_numpy()) if "train_count" in items else None
        return Popularity(model_cfg, len(items), counts), None
    if model_cfg.item_repr == "id":
        return Recommender(model_cfg, len(items)), None
    if backbone is None:
        backbone, tokenizer = load_backbone(model_cfg.backbone, model_cfg.trust_remote_code, model_cfg.backbone_dropout)
        backbone = apply_peft(backbone, _tuning(model_cfg, peft_cfg), total_steps)
    tokens, lengths = tokenize_catalog(tokenizer, items["text"].tolist(), model_cfg.max_text_tokens)
    pooling = pooling_for(backbone.base_model if hasattr(backbone, "peft_config") else backbone, model_cfg.pooling)
    if model_cfg.item_repr == "content":
        model = Content(model_cfg, len(items), backbone, tokens, lengths, pooling)
    else:
        seen = torch.tensor(items["train_count"].to_numpy() > 0) if "train_count" in items else None
        model = Recommender(model_cfg, len(items), backbone, tokens, lengths, pooling, seen)
    model.peft = METHODS[_tuning(model_cfg, peft_cfg).method]
    return model, tokenizer


def head_state(model: Recommender, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Every trained weight outside the backbone."""
    state = model.state_dict() if state is None else state
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith("backbone.")}


def save_model(model: Recommender, directory: Path, peft_cfg: PeftConfig, item_ids: list[str],
               state: dict | None = None) -> None:
    """Write a checkpoint atomically (temp directory, then rename)."""
    directory = Path(directory)
    staging = staging_for(directory)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(head_state(model, state), str(staging / HEADS))
    ranker = isinstance(model, Ranker)
    model_cfg = model.model_cfg if ranker else model.cfg
    if model.uses_text:
        backbone_state = None if state is None else {k[len("backbone."):]: v for k, v in state.items()
                                                     if k.startswith("backbone.")}
        save_backbone(model.backbone, _tuning(model_cfg, peft_cfg).method, staging, backbone_state)
    extra = {"ranker": asdict(model.cfg)} if ranker else {}
    (staging / MODEL_JSON).write_text(json.dumps({
        "model": asdict(model_cfg), "peft": asdict(peft_cfg), "num_items": model.num_items,
        "pooling": getattr(model, "pooling", None), "item_ids": list(item_ids), **extra}))
    publish_dir(staging, directory)


def read_model_json(directory: Path) -> dict:
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise ConfigError(f"{directory}: not a distrec checkpoint (no {MODEL_JSON})")
    return json.loads(path.read_text())


def _load_heads(directory: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(directory) / HEADS))
    except Exception as e:  # safetensors raises several types for corrupt or missing files
        raise ConfigError(f"{Path(directory) / HEADS}: cannot read the checkpoint ({e})") from None


def load_model(directory: str | Path, items: pd.DataFrame | None = None, tokenizer_dir: str | Path | None = None) -> Recommender:
    """Rebuild a checkpoint. With `items` (a newer catalog), item rows are matched by original
    id: known items keep their trained ID vectors, new ones start from zero (text scores them)."""
    directory = Path(directory)
    meta = read_model_json(directory)
    model_cfg, peft_cfg = from_dict(ModelConfig, meta["model"]), from_dict(PeftConfig, meta["peft"])
    if items is None:
        items = pd.DataFrame({"item_id": meta["item_ids"], "text": [""] * meta["num_items"]})
        if model_cfg.item_repr not in ("id", "popularity"):
            raise ConfigError("loading a text model needs the catalog (items.parquet) for the item text")
    backbone = tokenizer = None
    ranker_cfg = from_dict(RankerConfig, meta["ranker"]) if model_cfg.kind == "ranker" else None
    if model_cfg.kind == "ranker" or model_cfg.item_repr not in ("id", "popularity"):
        backbone, tokenizer = load_backbone(model_cfg.backbone, model_cfg.trust_remote_code, model_cfg.backbone_dropout)
        if tokenizer_dir is not None and Path(tokenizer_dir).exists():
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        backbone = load_backbone_weights(backbone, _tuning(model_cfg, peft_cfg).method, directory)
    if model_cfg.kind == "ranker" and list(items["item_id"]) != meta["item_ids"]:
        raise ConfigError(f"{directory}: a ranker trained on another catalog ({meta['num_items']:,} items) than "
                          f"this dataset's ({len(items):,}); train it on this dataset's retrieval candidates")
    model, tokenizer = build_model(model_cfg, peft_cfg, items, 1, backbone, tokenizer, ranker_cfg)
    model.tokenizer = tokenizer  # for callers that save it beside a continued run
    heads = _load_heads(directory)
    if list(items["item_id"]) != meta["item_ids"]:
        heads = _remap_items(heads, meta["item_ids"], list(items["item_id"]))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ConfigError(f"{directory}: checkpoint does not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return model


PER_ITEM = ("item_embedding.weight", "popularity")  # weights with one row per catalog item


def _remap_items(heads: dict, old_ids: list[str], new_ids: list[str]) -> dict:
    """Rows of per-item weights moved to the new catalog's order; new items get zeros."""
    position = {item: i for i, item in enumerate(old_ids)}
    rows = [(new, position[item]) for new, item in enumerate(new_ids) if item in position]
    out = dict(heads)
    for key in PER_ITEM:
        if key in heads:
            old = heads[key]
            new = torch.zeros((len(new_ids), *old.shape[1:]), dtype=old.dtype)
            if rows:
                new_rows, old_rows = map(list, zip(*rows))
                new[new_rows] = old[old_rows]
            out[key] = new
    return out


def trainable_backbone(model: nn.Module) -> bool:
    return getattr(model, "uses_text", False) and any(p.requires_grad for p in model.backbone.parameters())
