"""The second stage: a cross-encoder that reads a user's recent items and candidate items'
text together and scores each candidate (the seed's BertForSequenceClassification, after
LlamaRec 2023 for the listwise form).

One forward pass reads

    [start] h_1 [sep] h_2 [sep] ... [sep] [sep] c_1 [sep] c_2 [sep] ... c_P [sep]

the user's `history_items` latest items (newest first by default, within `history_tokens`),
then `per_pass` candidates of at most `item_tokens` tokens each. Candidate j's score is a
linear head on the hidden state of the separator *after* its text: in an encoder that state
sees everything, in a decoder (causal) it has read the history and the candidate, so the
same reading works for both. `per_pass=1` is the pointwise cross-encoder (one (history,
candidate) pair per pass); a user's C candidates take ceil(C / per_pass) passes.

The backbone is any Hugging Face model wrapped by a registered PEFT method (LoRA, AdaLoRA,
adapters, full, frozen); the head is trained with it. Objectives: `listwise` (a softmax over
the user's candidates, the true next item the label) or `pointwise` (binary cross-entropy
per candidate, the article's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from distrec.config import ConfigError, doc


@dataclass
class RankerConfig:
    samples: Optional[str] = doc(
        "model.kind=ranker: the ranker's candidates, a directory written by `distrec ranker-data` from a "
        "retrieval run (training prefixes' top candidates, validation and test candidates)", default=None)
    objective: Literal["listwise", "pointwise"] = doc(
        "listwise: softmax over each user's candidates (the true next item the label); pointwise: binary "
        "cross-entropy per (history, candidate) pair, the seed article's objective", default="listwise")
    per_pass: int = doc(
        "candidates read in one forward pass beside the history (1 = one pair per pass, the classic "
        "cross-encoder; more = one pass per user reads the history once: 1.4x (K=20) to 3.3x (K=50) fewer "
        "seconds per user on this CPU, BENCHMARKS.md)", default=24)
    history_items: int = doc("the user's latest items the ranker reads", default=5)
    history_tokens: int = doc("token budget of the history text (its oldest items are cut first)", default=64)
    item_tokens: int = doc("token budget of each candidate's text", default=12)
    history_order: Literal["newest_first", "newest_last"] = doc(
        "order of the history items in the text", default="newest_first")
    retrieval_scale: float = doc(
        "the final score is the ranker's logit + this x the retrieval score (0 = the ranker alone): the ranker "
        "learns a correction of the first stage (its head starts near 0, so step 0 ranks as the retriever does); "
        "for a cosine retriever 1 / its temperature puts both on the retriever's softmax scale", default=0.0)
    shuffle: bool = doc("training: the candidates of a user in a random order each step (the retriever's order "
                        "would tell the ranker where the positive sits)", default=True)

    def __post_init__(self):
        if self.per_pass < 1 or self.history_items < 0 or self.history_tokens < 0 or self.item_tokens < 1:
            raise ValueError("ranker.per_pass >= 1, ranker.item_tokens >= 1, ranker.history_items and "
                             "ranker.history_tokens >= 0 required")


def item_token_lists(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each item's text as token ids without special tokens, at most `max_tokens`."""
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [list(ids) for ids in encoded]


def special_ids(tokenizer) -> tuple[int | None, int, int]:
    """(start or None, separator, padding) token ids, for encoders ([CLS] [SEP]) and decoders (BOS EOS)."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if sep is None:
        raise ValueError("the ranker's backbone tokenizer has neither a separator nor an end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    return start, sep, pad


class Ranker(nn.Module):
    """Backbone (PEFT-wrapped) + a linear scoring head; `score()` for inference, `forward()` the loss."""

    uses_text = True
    uses_id = False
    kind = "ranker"

    def __init__(self, cfg: RankerConfig, backbone: nn.Module, tokenizer, texts: list[str], num_items: int,
                 pos_weight: float = 1.0, pooling: str = "mean"):
        super().__init__()
        self.cfg, self.backbone, self.num_items, self.pos_weight = cfg, backbone, num_items, pos_weight
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.items = item_token_lists(tokenizer, texts, cfg.item_tokens)
        self.start, self.sep, self.pad = special_ids(tokenizer)
        self.max_positions = getattr(backbone.config, "max_position_embeddings", None)
        # how a candidate's state is read: "mean" over its text and separator (encoders: a [SEP]'s own
        # state barely differs between candidates, measured on Beauty: per-user logit spread 0.01
        # after 200 steps), "last" = its separator (decoders: the one position that has read it all)
        self.pooling = "last" if pooling in ("last", "cls") else "mean"
        self.peft = None  # the PEFT method's hooks (distrec.models.peft_methods.PeftMethod)

    # the trainer's two-tower hooks: a ranker has no item cache and no live items
    def refresh_cache(self, batch_size: int = 256) -> None:
        pass

    # -- inputs ----------------------------------------------------------------------------
    def history_tokens(self, history) -> list[int]:
        """The history text: its latest `history_items`, within `history_tokens` (oldest cut first)."""
        cfg = self.cfg
        recent = [int(i) for i in list(history)[-cfg.history_items:] if int(i) >= 0] if cfg.history_items else []
        pieces, used = [], 0
        for item in reversed(recent):  # newest first while the budget lasts
            ids = self.items[item] + [self.sep]
            if used + len(ids) > cfg.history_tokens:
                ids = ids[:max(cfg.history_tokens - used, 0)]
            if not ids:
                break
            pieces.append(ids)
            used += len(ids)
        if cfg.history_order == "newest_last":
            pieces.reverse()
        return [t for piece in pieces for t in piece]

    def passes(self, histories: list, candidates: torch.Tensor):
        """Token ids (P, T), attention mask (P, T), marker positions and each candidate's first token
        (P, per_pass; -1 = none), and
        each pass's user row and first candidate column: a user's C candidates in ceil(C / per_pass)
        passes, right-padded."""
        per = self.cfg.per_pass
        count = candidates.shape[1]
        chunks = math.ceil(count / per)
        size = math.ceil(count / chunks)  # even passes: 24 candidates at per_pass 20 -> 2 of 12
        rows, markers, starts, owners = [], [], [], []
        cands = candidates.tolist()
        for user, history in enumerate(histories):
            head = ([self.start] if self.start is not None else []) + self.history_tokens(history) + [self.sep]
            for first in range(0, count, size):
                ids, marks, begins = list(head), [], []
                for item in cands[user][first:first + size]:
                    begins.append(len(ids))
                    ids += self.items[item] if item >= 0 else []
                    ids.append(self.sep)
                    marks.append(len(ids) - 1)
                rows.append(ids)
                markers.append(marks + [-1] * (size - len(marks)))
                starts.append(begins + [-1] * (size - len(begins)))
                owners.append((user, first))
        width = max(len(r) for r in rows)
        if self.max_positions and width > self.max_positions:
            raise ConfigError(f"a ranker pass is {width} tokens, above the backbone's {self.max_positions}: lower "
                             "ranker.per_pass, ranker.item_tokens or ranker.history_tokens")
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        return ids, mask, torch.tensor(markers), torch.tensor(starts), owners, size

    def logits(self, histories: list, candidates: torch.Tensor, retrieval: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) candidate scores (-inf where the candidate is -1, padding); `retrieval` (B, C): the
        first stage's scores, added times `retrieval_scale`."""
        device = self.head.weight.device
        ids, mask, markers, starts, owners, size = self.passes(histories, candidates)
        hidden = self.backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        valid = markers >= 0
        rows = torch.arange(len(markers)).unsqueeze(1).expand_as(markers)
        if self.pooling == "last":
            picked = hidden[rows[valid].to(device), markers[valid].to(device)]  # (n, H)
        else:  # the mean of each candidate's span: its text and its separator
            positions = torch.arange(ids.shape[1])
            span = (positions >= starts.unsqueeze(-1)) & (positions <= markers.unsqueeze(-1))  # (P, S, T)
            span = (span & valid.unsqueeze(-1)).to(device=device, dtype=hidden.dtype)
            pooled = torch.einsum("pst,pth->psh", span, hidden) / span.sum(-1, keepdim=True).clamp(min=1)
            picked = pooled[valid.to(device)]
        with torch.autocast(device.type, enabled=False):  # fp32: bf16 scores would tie (8-bit mantissa)
            scores = self.head(picked.float()).squeeze(-1)
        out = torch.full(candidates.shape, float("-inf"), device=device)
        users = torch.tensor([u for u, _ in owners]).unsqueeze(1).expand_as(markers)
        columns = torch.tensor([f for _, f in owners]).unsqueeze(1) + torch.arange(size).unsqueeze(0)
        out[users[valid].to(device), columns[valid].to(device)] = scores
        if self.cfg.retrieval_scale and retrieval is not None:
            out = out + self.cfg.retrieval_scale * retrieval.to(device).float()
        return out.masked_fill(candidates.to(device) < 0, float("-inf"))

    @torch.inference_mode()
    def score(self, histories: list, candidates: torch.Tensor, retrieval: torch.Tensor | None = None,
              batch_size: int = 64) -> torch.Tensor:
        """(B, C) scores of each user's candidates, `batch_size` users per forward."""
        parts = [self.logits(histories[s:s + batch_size], candidates[s:s + batch_size],
                             None if retrieval is None else retrieval[s:s + batch_size]).cpu()
                 for s in range(0, len(histories), batch_size)]
        return torch.cat(parts) if parts else torch.empty(candidates.shape)

    # -- training --------------------------------------------------------------------------
    def forward(self, history: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor,
                retrieval: torch.Tensor | None = None):
        """(loss, None, regulariser): the objective over each user's candidates, which hold the
        target. history (B, L) left-padded with -1; candidates and retrieval scores (B, C)."""
        candidates = candidates.cpu()
        retrieval = None if retrieval is None else retrieval.cpu()
        if self.training and self.cfg.shuffle:
            order = torch.argsort(torch.rand(candidates.shape), dim=1)
            candidates = candidates.gather(1, order)
            retrieval = None if retrieval is None else retrieval.gather(1, order)
        histories = [row[row >= 0].tolist() for row in history.cpu()]
        logits = self.logits(histories, candidates, retrieval)
        is_target = candidates.to(logits.device) == target.to(logits.device).unsqueeze(1)
        if self.cfg.objective == "listwise":
            loss = nn.functional.cross_entropy(logits, is_target.float().argmax(1))
        else:
            valid = candidates.to(logits.device) >= 0
            weight = torch.where(is_target, self.pos_weight, 1.0)[valid]
            loss = nn.functional.binary_cross_entropy_with_logits(logits[valid], is_target[valid].float(), weight)
        hook = self.peft.regulariser if self.peft is not None else None
        regulariser = hook(self.backbone) if hook is not None else None
        return loss, None, regulariser if regulariser is not None else torch.zeros((), device=loss.device)

    def unreached_params(self) -> list[nn.Parameter]:
        hook = self.peft.unreached if self.peft is not None else None
        return hook(self.backbone) if hook is not None else []
