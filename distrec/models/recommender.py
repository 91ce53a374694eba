"""The two-tower recommender scored by dot product (after HLLM, ByteDance 2024).

Item tower: the (PEFT-tuned) backbone reads the item's text, pooled and projected to
`dim`; optionally plus a learned ID embedding (`item_repr: text | id | text+id`).
User tower: a small causal transformer over the user's history of item vectors; the state
after the last item is the user vector, and the state after every item predicts the next
one in training (SASRec's objective).

Affordable on CPU: item text is tokenised once; the pooled backbone output of every item
sits in a cache that training refreshes every N steps, while each step encodes a bounded
set of "live" items (the batch's targets first) through the backbone with gradients. The
projection and ID embeddings apply to the whole cached table on every step, so they learn
from every position and the full-catalog softmax.
"""

from __future__ import annotations

import torch
from torch import nn

from distrec.models import losses
from distrec.models.backbone import pool
from distrec.models.config import ModelConfig


class UserTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_len, self.heads = cfg.max_len, cfg.heads
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)  # by recency: 0 = the latest item
        # small, like the item vectors: at N(0, 1) (torch's default) positions drown the items
        nn.init.normal_(self.positions.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim * cfg.ffn_mult, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False) if cfg.layers else None
        self.norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, items: torch.Tensor, valid: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """items (B, L, d) left-padded, valid (B, L) -> states (B, L, d); with `last_only`
        (B, 1, d), the state after the latest item only: the last layer then attends from that
        one position instead of all L (what scoring and evaluation need, at O(L) not O(L^2))."""
        batch, length, _ = items.shape
        recency = torch.arange(length - 1, -1, -1, device=items.device).clamp(max=self.max_len - 1)
        x = self.dropout(items + self.positions(recency)) * valid.unsqueeze(-1)
        if self.blocks is not None:
            # causal, padding keys hidden, every position may see itself (no all-masked rows -> no
            # NaN); boolean, True = may not attend
            blocked = torch.ones(length, length, dtype=torch.bool, device=items.device).triu(1)
            blocked = (blocked.unsqueeze(0) | ~valid.unsqueeze(1)) & ~torch.eye(length, dtype=torch.bool,
                                                                                 device=items.device)
            mask = blocked.repeat_interleave(self.heads, dim=0)
            layers = list(self.blocks.layers)
            for layer in layers[:-1] if last_only else layers:
                x = layer(x, src_mask=mask)
            if last_only:
                x = self._last_position(layers[-1], x, blocked[:, -1])
        elif last_only:
            x = x[:, -1:]
        return self.norm(x)

    @staticmethod
    def _last_position(layer: nn.TransformerEncoderLayer, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """`layer` (pre-norm) computed for the last position only: its query against every key
        it may see (`blocked` (B, L) True = not), then the feed-forward."""
        h = layer.norm1(x)
        attended = layer.self_attn(h[:, -1:], h, h, key_padding_mask=blocked, need_weights=False)[0]
        last = x[:, -1:] + layer.dropout1(attended)
        return last + layer._ff_block(layer.norm2(last))


class Popularity(nn.Module):
    """The most-popular baseline through the same interface: every user gets the catalog
    ranked by training popularity (a 1-d "item vector" log(1 + count), user vector 1)."""

    uses_text = uses_id = False

    def __init__(self, cfg: ModelConfig, num_items: int, train_count: torch.Tensor | None = None):
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        counts = torch.zeros(num_items) if train_count is None else train_count.double().log1p().float()
        self.register_buffer("popularity", counts)

    def refresh_cache(self, batch_size: int = 256) -> None:
        pass

    def item_table(self, live_items=None, live_pooled=None) -> torch.Tensor:
        return self.popularity.unsqueeze(1)

    def user_vectors(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return torch.ones(history.shape[0], 1, device=table.device, dtype=table.dtype)


class TextItems(nn.Module):
    """Item text through the backbone into a pooled cache (N, H), optionally PCA-whitened.

    The whitening (mean and matrix) is fitted once on the catalog's pooled text, by
    `fit_whitening` before training starts, and then kept fixed and saved with the heads;
    the cache holds whitened rows, so the per-step cost is the live rows' (n, H) x (H, H)."""

    peft = None  # the backbone's PEFT method (distrec.models.peft_methods.PeftMethod): its hooks

    def _init_text(self, cfg: ModelConfig, backbone, tokens, lengths, pooling: str) -> None:
        if backbone is None or tokens is None:
            raise ValueError("a text item tower needs a backbone and the catalog's tokens")
        self.backbone, self.pooling = backbone, pooling
        hidden = backbone.config.hidden_size
        self.register_buffer("item_tokens", tokens, persistent=False)
        self.register_buffer("item_lengths", lengths, persistent=False)
        self.register_buffer("pooled_cache", torch.zeros(len(lengths), hidden), persistent=False)
        self.whiten = cfg.whiten
        if cfg.whiten:
            self.register_buffer("text_mean", torch.zeros(hidden))
            self.register_buffer("text_whitening", torch.eye(hidden))
            self.register_buffer("whitening_fitted", torch.zeros((), dtype=torch.bool))

    def encode_text(self, items: torch.Tensor) -> torch.Tensor:
        """Pooled (and whitened, once fitted) backbone output (n, H) of items, padded to their own longest text."""
        lengths = self.item_lengths[items]
        width = int(lengths.max())
        ids = self.item_tokens[items, :width].long()
        mask = torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = pool(hidden, mask, self.pooling).float()
        if self.whiten and bool(self.whitening_fitted):
            with torch.autocast(pooled.device.type, enabled=False):  # fp32: its entries span orders of magnitude
                pooled = (pooled - self.text_mean) @ self.text_whitening
        return pooled

    @torch.no_grad()
    def refresh_cache(self, batch_size: int = 256) -> None:
        """Re-encode the whole catalog into the pooled cache (backbone in eval mode)."""
        if not self.uses_text:
            return
        was_training = self.backbone.training
        self.backbone.eval()
        # longest texts first, so each batch pads to a similar width
        order = torch.argsort(self.item_lengths, descending=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            self.pooled_cache[chunk] = self.encode_text(chunk)
        self.backbone.train(was_training)

    @torch.no_grad()
    def backbone_text(self) -> torch.Tensor:
        """The catalog's pooled text as the backbone embeds it (N, H): the cache with its
        whitening undone. Similarity wants this space, where the pretrained encoder's cosine
        says "two lipsticks"; whitened, every direction weighs the same and cosines sit near 0."""
        cache = self.pooled_cache.double()
        if not (self.whiten and bool(self.whitening_fitted)):
            return cache.float()
        w = self.text_whitening.double()  # eigenvectors / sqrt(eigenvalue): its inverse is (w / |col|^2)^T
        return (cache @ (w / w.pow(2).sum(0, keepdim=True)).T + self.text_mean.double()).float()

    @property
    def needs_fit(self) -> bool:
        return self.uses_text and self.whiten and not bool(self.whitening_fitted)

    @torch.no_grad()
    def fit_whitening(self, batch_size: int = 256, eps: float = 1e-6) -> None:
        """PCA-whitening of the catalog's pooled text (BERT-whitening, Su et al. 2021; UniSRec's
        (x - b)W starts here): columns ordered by explained variance, so the first `dim` are the
        PCA reduction. Then the cache is re-encoded whitened, and with `content_init` the
        projection starts as the top-`dim` components."""
        self.refresh_cache(batch_size)
        x = self.pooled_cache.double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        self.text_mean.copy_(mean.float())
        self.text_whitening.copy_((vectors / (values.clamp(min=0) + eps).sqrt()).float())
        self.whitening_fitted.fill_(True)
        self.pooled_cache.copy_(((x - mean) @ self.text_whitening.double()).float())
        if getattr(self.cfg, "content_init", False) and hasattr(self, "project"):
            weight = torch.zeros_like(self.project.weight)
            k = min(weight.shape[0], weight.shape[1])
            weight[:k, :k] = torch.eye(k) / k ** 0.5  # unit-norm-ish rows: whitened components have variance 1
            self.project.weight.copy_(weight)
            self.project.bias.zero_()


class Recommender(TextItems):
    """The two-tower model: items are their text through the backbone (item_repr text), an ID
    vector (id), or both fused (text+id); a user is a causal transformer over their history's item
    vectors. `item_table()` embeds the catalog, `user_vectors()` the users, `forward()` is the loss."""

    def __init__(self, cfg: ModelConfig, num_items: int, backbone: nn.Module | None = None,
                 tokens: torch.Tensor | None = None, lengths: torch.Tensor | None = None, pooling: str = "mean",
                 seen_items: torch.Tensor | None = None):
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        self.uses_text = cfg.item_repr in ("text", "text+id")
        self.uses_id = cfg.item_repr in ("id", "text+id")
        self.cosine = cfg.score == "cosine"
        self.objective = losses.Objective()
        if self.uses_text:
            self._init_text(cfg, backbone, tokens, lengths, pooling)
            self.project = nn.Linear(backbone.config.hidden_size, cfg.dim)
            if cfg.adaptor_hidden:
                hidden = backbone.config.hidden_size
                self.adaptor = nn.Sequential(nn.Linear(hidden, cfg.adaptor_hidden), nn.GELU(),
                                             nn.Linear(cfg.adaptor_hidden, cfg.dim))
                nn.init.zeros_(self.adaptor[2].weight)  # step 0: the projection alone (content_init's model)
                nn.init.zeros_(self.adaptor[2].bias)
        else:
            self.whiten = False
        if self.uses_id:
            self.item_embedding = nn.Embedding(num_items, cfg.dim)
            # beside text, IDs start at zero so unseen (cold) items are scored by their text alone
            nn.init.normal_(self.item_embedding.weight, std=0.02) if not self.uses_text \
                else nn.init.zeros_(self.item_embedding.weight)
            if self.uses_text:
                # beside text, only items seen in training use their ID vector: an unseen item's
                # row only ever receives the softmax's "negative" gradient, which would bury
                # exactly the cold items the text is there to surface (measured on Beauty)
                mask = torch.ones(num_items) if seen_items is None else seen_items.float()
                self.register_buffer("id_mask", mask.unsqueeze(1), persistent=False)
        self.user_tower = UserTower(cfg)

    # -- items ---------------------------------------------------------------------------
    def item_table(self, live_items: torch.Tensor | None = None, live_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d) vectors of the whole catalog; rows of `live_items` from `live_pooled` (with gradients).
        Cosine: the text vector is unit-norm, the ID correction (bounded by `id_max_norm`) is added,
        and the sum is normalised again; an item without an ID row is its text vector."""
        table = 0
        if self.uses_text:
            pooled = self.pooled_cache
            if live_items is not None:
                pooled = pooled.index_put((live_items,), live_pooled)
            table = self.project(pooled)
            if self.cfg.adaptor_hidden:
                table = table + self.adaptor(pooled)
            if self.cosine:
                table = nn.functional.normalize(table, dim=-1)
        if self.uses_id:
            ids = self.item_embedding.weight
            if hasattr(ids, "ds_id"):  # DeepSpeed ZeRO-3 partitions it: a module call gathers it
                ids = self.item_embedding(torch.arange(self.num_items, device=ids.device))
            if self.uses_text:
                ids = ids * self.id_mask
                if self.cosine and self.cfg.id_max_norm:
                    ids = ids * (self.cfg.id_max_norm / ids.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
            table = table + ids
        if self.cosine:
            table = nn.functional.normalize(table, dim=-1)
        return table

    # -- users ---------------------------------------------------------------------------
    def user_states(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """history (B, L) left-padded with -1 -> states (B, L, d)."""
        history = history[:, -self.cfg.max_len:]
        valid = history >= 0
        # one dropout on the input (in the user tower, on items + positions), as SASRec; with a
        # second one here ML-1M validation NDCG@10 stood at 0.158 after 35 epochs
        return self.user_tower(table[history.clamp(min=0)] * valid.unsqueeze(-1), valid)

    def user_vectors(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, d): the state after each user's latest item (the last layer run for it alone)."""
        history = history[:, -self.cfg.max_len:]
        valid = history >= 0
        users = self.user_tower(table[history.clamp(min=0)] * valid.unsqueeze(-1), valid, last_only=True)[:, -1]
        return nn.functional.normalize(users, dim=-1) if self.cosine else users

    # -- training ------------------------------------------------------------------------
    def forward(self, history: torch.Tensor, target: torch.Tensor, live_items: torch.Tensor | None = None):
        """Loss of predicting each next item: history[t+1] from position t, target from the last.

        Returns (loss, live_pooled, regulariser): live_pooled so the caller can write fresh
        rows into the cache; regulariser = AdaLoRA's orthogonality term (0 otherwise).
        """
        history = history[:, -self.cfg.max_len:]
        live_pooled = self.encode_text(live_items) if live_items is not None else None
        table = self.item_table(live_items, live_pooled)
        labels = torch.cat([history[:, 1:], target.unsqueeze(1)], dim=1)
        valid = history >= 0
        states = self.user_states(history, table)[valid]
        labels = labels[valid]
        if self.cosine:
            states = nn.functional.normalize(states, dim=-1) / self.cfg.temperature
        loss = losses.compute(states, labels, table, self.objective)
        hook = self.peft.regulariser if self.uses_text and self.peft is not None else None
        regulariser = hook(self.backbone) if hook is not None else None
        return loss, live_pooled, regulariser if regulariser is not None else torch.zeros((), device=loss.device)

    def unreached_params(self) -> list[nn.Parameter]:
        """The PEFT method's weights that no module call reads (AdaLoRA's): ZeRO-3 keeps them whole."""
        hook = self.peft.unreached if self.uses_text and self.peft is not None else None
        return hook(self.backbone) if hook is not None else []


class Content(TextItems):
    """The content baseline: nothing trained. Items are their pooled backbone text,
    L2-normalised (optionally whitened first); a user is the decayed mean of the vectors of
    their `content_recent` latest items (weights 1, decay, decay^2, ...), normalised, so a
    score is the cosine between an item's text and the user's recent text. It ranks new
    items exactly like old ones."""

    uses_id = False
    uses_text = True
    cosine = True

    def __init__(self, cfg: ModelConfig, num_items: int, backbone: nn.Module, tokens: torch.Tensor,
                 lengths: torch.Tensor, pooling: str = "mean"):
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        self._init_text(cfg, backbone, tokens, lengths, pooling)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def item_table(self, live_items=None, live_pooled=None) -> torch.Tensor:
        return nn.functional.normalize(self.pooled_cache, dim=-1)

    def user_vectors(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        recent = history[:, -self.cfg.content_recent:]
        valid = recent >= 0
        # the latest item (rightmost) weighs 1, the one before it `decay`, ...
        age = torch.arange(recent.shape[1] - 1, -1, -1, device=recent.device, dtype=table.dtype)
        weights = (self.cfg.content_decay ** age) * valid.to(table.dtype)
        users = (table[recent.clamp(min=0)] * weights.unsqueeze(-1)).sum(1)
        return nn.functional.normalize(users, dim=-1)
