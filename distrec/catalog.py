"""The catalog as every stage sees it: each item's primary category, and the item vectors
and similarity vectors of a trained run over it (what scoring ranks by, and what policies
and ILD call alike). Shared by `distrec score` and `distrec evaluate`, owned by neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from distrec.config import ConfigError
from distrec.models.run import load_model


def primary_categories(items: pd.DataFrame, level: int) -> tuple[torch.Tensor, list[str]]:
    """(I,) category id of each item at `level` of its category list (-1: none), and the names."""
    names: dict[str, int] = {}
    ids = []
    for cats in items["categories"]:
        cats = list(cats)
        if not cats:
            ids.append(-1)
            continue
        name = cats[level] if -len(cats) <= level < len(cats) else cats[-1]
        ids.append(names.setdefault(name, len(names)))
    return torch.tensor(ids, dtype=torch.long), list(names)


def catalog_vectors(run: str | Path, items: pd.DataFrame, similarity: str = "model", category_level: int = -1,
                    device: str = "auto"):
    """(item vectors, popularity, similarity vectors or None) of the catalog under run's best
    checkpoint, embedded once (batched through the item tower; on the GPU when there is one and
    `device` is not 'cpu'). `similarity`: 'text' = the item tower's pooled text as the backbone
    embeds it (whitening undone), L2-normalised; 'category' = one-hot primary categories (alike =
    same category); 'model' = None (the item vectors themselves)."""
    model = load_model(Path(run) / "best", items, Path(run) / "tokenizer")
    if similarity == "text" and not getattr(model, "uses_text", False):
        raise ConfigError(f"similarity=text: run {run} has no text item tower (model.item_repr="
                          f"{model.cfg.item_repr}); use similarity=model or category, or a text run")
    if device != "cpu" and torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    with torch.no_grad():
        model.refresh_cache()
        table = model.item_table().float().cpu().numpy()
        similar = None
        if similarity == "text":
            similar = torch.nn.functional.normalize(model.backbone_text(), dim=-1).cpu().numpy()
    if similarity == "category":
        categories, names = primary_categories(items, category_level)
        categories = np.asarray(categories)
        similar = np.zeros((len(items), max(len(names), 1)), dtype=np.float32)
        has = categories >= 0  # an item without a category is alike no other
        similar[np.flatnonzero(has), categories[has]] = 1.0
    popularity = np.log1p(items["train_count"].to_numpy().astype(np.float32))
    return table, popularity, similar
