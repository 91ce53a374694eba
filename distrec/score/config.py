"""The config of `distrec score` (`distrec score --help-config` lists it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distrec.config import doc
from distrec.policies import POLICIES, strength_doc


@dataclass
class PolicyConfig:
    # a str checked against the registry when the config is built (not a Literal fixed at import):
    # a policy registered later (a plug-in, a test) is accepted like the built-in ones
    name: str = doc("re-ranking policy over each user's candidates, a registered one: " + " | ".join(POLICIES),
                    default="none")
    strength: float = doc(strength_doc(), default=0.5)
    window: int = doc("dpp: sliding window (0 = the whole list)", default=0)
    similarity: Literal["model", "text", "category"] = doc(
        "mmr and dpp: what makes two items alike - 'model': the cosine of their item vectors; 'text': the "
        "cosine of the item tower's text embeddings (pooled backbone output; a text run only): two lipsticks "
        "are alike whatever their histories; 'category': the same category (category_level)", default="model")

    def __post_init__(self):
        POLICIES.check(self.name, "policy.name")
        if not POLICIES[self.name].valid(self.strength):
            raise ValueError(f"policy.strength={self.strength} is out of range for policy {self.name!r}: "
                             f"{POLICIES[self.name].strength}")
        if self.window < 0:
            raise ValueError("policy.window must be >= 0")


@dataclass
class RankerStageConfig:
    run: Optional[str] = doc(
        "a ranker run (distrec train with model.kind=ranker): the second stage re-scores each user's top "
        "`ranker.candidates` retrieval candidates by reading their text beside the user's (null = retrieval only)",
        default=None)
    candidates: int = doc("retrieval candidates the ranker re-scores per user (the list is picked among them)",
                          default=50)
    new_items: int = doc(
        "the user's best-scored unseen new items (no training interaction) the ranker reads beside the retrieved "
        "ones: a cold item's vector is its text alone, so the whole-catalog top-N rarely holds one, and the "
        "ranker, which reads its text, decides whether it rises. With new_item_slots, a slot takes the new item "
        "the ranker scored highest (0 = off; the retrieval recall@K counts the retrieved ones only)", default=0)
    batch_size: int = doc("users per ranker forward", default=32)
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "the ranker's forward: 'auto' = bf16 autocast on CUDA GPUs with bf16 and on CPUs with AMX or AVX512-BF16 "
        "(measured 1.6x faster on this CPU at ~300 tokens), else fp32", default="auto")

    def __post_init__(self):
        if self.candidates < 1 or self.batch_size < 1 or self.new_items < 0:
            raise ValueError("ranker.candidates and ranker.batch_size must be >= 1, ranker.new_items >= 0")


@dataclass
class ScoreConfig:
    run: Optional[str] = doc("a run directory written by distrec train", default=None)
    data: Optional[str] = doc("the prepared dataset the run was trained on (or a newer one with the same items)", default=None)
    out: Optional[str] = doc("output directory of Parquet parts (re-running resumes)", default=None)
    address: Optional[str] = doc("Ray cluster: null = a local Ray on this machine, 'auto', or ray://host:port", default=None)
    users: Literal["test", "val", "all"] = doc(
        "whose lists: 'test' (test users, history = train + validation), 'val', or 'all' (every user, "
        "whole history: the nightly production run)", default="test")
    candidates: int = doc("top-N candidates per user from the full catalog, before re-ranking", default=200)
    k: int = doc("items per final list; shorter for a user with fewer unseen items (seen items are never "
                 "recommended; summary.json counts them as short_lists)", default=20)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ranker: RankerStageConfig = field(default_factory=RankerStageConfig)
    new_item_slots: int = doc(
        "lists hold at least this many new items (items with no training interaction: cold ones) within their "
        "first `new_item_rank` positions; where the list (after the policy) has fewer, the user's best-scored "
        "unseen new items outside them are put there (one listed lower moves up) and the rest move down (0 = off)",
        default=0)
    new_item_rank: int = doc("new_item_slots: the positions they are reserved in (the first N of each list)",
                             default=10)
    batch_size: int = doc("users per block (one Parquet part each)", default=1024)
    actors: int = doc("scoring actors (0 = one per node, each with the node's CPUs as threads; "
                      "at most the number of blocks; policy exposure: always one, so its cap holds across the job)",
                      default=0)
    category_level: int = doc("which entry of an item's category list is its category (-1 = the most specific)", default=-1)
    faiss: bool = doc("top-N with FAISS IndexFlatIP instead of the blocked matrix product (it is fastest from ~2,000 "
                      "queries per search: set batch_size=4096 with it; BENCHMARKS.md)", default=False)
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "product of the top-N: 'fp32' for every item; 'bf16' for candidates rescored in fp32 (the same "
        "top-N, proven per user; users it cannot prove are redone in fp32); 'auto' = bf16 on CPUs with AMX or "
        "AVX512-BF16 and on CUDA GPUs with bf16, for catalogs of 2^24 item-dims or more (262,144 items x 64 dims, "
        "65,536 x 256)", default="auto")
    device: Literal["auto", "cpu", "cuda"] = doc(
        "where the actors score: 'auto' = one actor per GPU when the Ray cluster has GPUs (user tower and "
        "product on it), else the CPUs; 'cpu'; 'cuda' (an error if the cluster has no GPUs)", default="auto")
    overwrite: bool = doc(
        "replace an output directory written by a different scoring job (another checkpoint, dataset or "
        "config): its parts, summary and job files only, never other files", default=False)
    progress: bool = doc("one progress bar over the blocks on a terminal (Ray's own logs and bars: "
                         "--verbose, or DISTREC_VERBOSE=1)", default=True)

    def __post_init__(self):
        if self.k < 1 or self.candidates < self.k:
            raise ValueError("k >= 1 and candidates >= k required")
        if self.ranker.run and not self.k <= self.ranker.candidates <= self.candidates:
            raise ValueError(f"ranker.candidates ({self.ranker.candidates}) must be in [k, candidates] = "
                             f"[{self.k}, {self.candidates}]")
        if self.new_item_slots < 0 or self.new_item_rank < 1 or self.new_item_slots > min(self.new_item_rank, self.k):
            raise ValueError("new_item_slots must be in [0, min(new_item_rank, k)] and new_item_rank >= 1")
        if self.batch_size < 1 or self.actors < 0:
            raise ValueError("batch_size >= 1 and actors >= 0 required")
