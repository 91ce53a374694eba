"""Training objectives over (user state, target item) pairs, as pure functions, and their
registry (LOSSES): `train.loss` names one, its help is the entry's `doc`, and
`Recommender.forward` calls the entry. A new loss is one `register(...)` here plus its test.

states: (P, d) user states at the P positions that have a next item; labels: (P,) item
indices; table: (N, d) item vectors of the whole catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from distrec.registry import Registry


@dataclass
class Objective:
    """The loss `Recommender.forward` computes and its options (set by the training code from
    train.loss and its keys)."""

    kind: str = "softmax"  # a LOSSES name
    num_negatives: int = 256
    bce_negatives: int = 4
    pos_weight: float = 1.0
    log_q: torch.Tensor | None = None


@dataclass(frozen=True)
class Loss:
    name: str
    doc: str                                                   # what it is, for --help-config
    compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Objective], torch.Tensor]


LOSSES = Registry("loss")
register = LOSSES.register


def compute(states: torch.Tensor, labels: torch.Tensor, table: torch.Tensor, objective: Objective) -> torch.Tensor:
    """The loss `objective.kind` of the states against their labels over the item table."""
    return LOSSES[objective.kind].compute(states, labels, table, objective)


def loss_doc() -> str:
    return LOSSES.describe()


def full_softmax(states: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the whole catalog (SASRec+ / "full softmax")."""
    return F.cross_entropy(states @ table.T, labels)


def sampled_softmax(states: torch.Tensor, labels: torch.Tensor, table: torch.Tensor, num_negatives: int,
                    log_q: torch.Tensor) -> torch.Tensor:
    """Softmax over the batch's own targets (in-batch negatives) plus `num_negatives` uniform
    random items, with the log-q correction (Yi et al., RecSys 2019): each candidate's logit
    minus the log of its chance of being a candidate, so popular items are not over-penalised.

    log_q: (N,) log inclusion probability of each item as a candidate.
    """
    negatives = torch.randint(0, table.shape[0], (num_negatives,), device=labels.device)
    candidates, inverse = torch.unique(torch.cat([labels, negatives]), return_inverse=True)
    logits = states @ table[candidates].T - log_q[candidates]
    return F.cross_entropy(logits, inverse[: len(labels)])


def inclusion_log_q(train_counts: torch.Tensor, positions_per_batch: int, num_negatives: int) -> torch.Tensor:
    """log P(item is a candidate): drawn as some position's target (by popularity) or uniformly."""
    share = train_counts.double() / train_counts.sum().clamp(min=1)
    n = len(train_counts)
    q = 1.0 - (1.0 - share) ** positions_per_batch * (1.0 - 1.0 / n) ** num_negatives
    return q.clamp(min=1e-12).log().float()


def binary_cross_entropy(states: torch.Tensor, labels: torch.Tensor, table: torch.Tensor,
                         negatives_per_positive: int, pos_weight: float) -> torch.Tensor:
    """The seed article's pointwise objective: click probability sigmoid(u . v), positives
    weighted by `pos_weight` (imbalanced data), `negatives_per_positive` random negatives
    (a negative equal to the positive is masked out)."""
    positive = (states * table[labels]).sum(-1)
    negatives = torch.randint(0, table.shape[0], (len(labels), negatives_per_positive), device=labels.device)
    negative = torch.einsum("pd,pkd->pk", states, table[negatives])
    keep = (negatives != labels.unsqueeze(1)).float()
    loss_pos = F.binary_cross_entropy_with_logits(positive, torch.ones_like(positive), reduction="sum")
    loss_neg = (F.binary_cross_entropy_with_logits(negative, torch.zeros_like(negative), reduction="none") * keep).sum()
    return (pos_weight * loss_pos + loss_neg) / (pos_weight * len(labels) + keep.sum()).clamp(min=1.0)


register(Loss("softmax", "full softmax over the catalog (cached item vectors)",
              lambda s, y, t, o: full_softmax(s, y, t)))
register(Loss("sampled_softmax", "in-batch + random negatives (train.num_negatives) with log-q correction",
              lambda s, y, t, o: sampled_softmax(s, y, t, o.num_negatives, o.log_q)))
register(Loss("bce", "the seed's pointwise binary cross-entropy (train.bce_negatives, train.pos_weight)",
              lambda s, y, t, o: binary_cross_entropy(s, y, t, o.bce_negatives, o.pos_weight)))
