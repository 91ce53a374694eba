"""The re-ranking policies: one registry, read by the score config (names, what `strength`
means, its range), `--help-config`, the scoring job, `evaluate --sweep` and the tests.

A new policy is one `register(Policy(...))` here, its function (in `distrec.diversity` or
anywhere) and its test. It picks k of each user's candidates from a `Candidates` (what a
block of users brings: relevance, candidate items, and what the policy said it needs).

    picks = rerank(cfg.policy, Candidates(relevance, items, k, similar=..., categories=...))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from distrec.registry import Registry

if TYPE_CHECKING:
    import torch


class _Diversity:
    """distrec.diversity on first use: the registry itself loads without torch (the CLI reads it)."""

    def __getattr__(self, name):
        from distrec import diversity as module

        return getattr(module, name)


diversity = _Diversity()

NEEDS = ("vectors", "categories", "history", "job")


@dataclass
class Candidates:
    """One block of users' candidates and what a policy may read beside them.

    relevance (B, N): -inf marks padding (a user with fewer unseen items), picked last.
    items (B, N): catalog indices. similar (num_items, D): what 'alike' means (policy.similarity).
    categories (num_items,): each item's primary category (-1 = none), num_categories of them.
    histories: the users' histories (catalog indices). shown (num_items,) long: lists each item
    is in across the job so far, updated in place; users: the job's users; filled (B,) bool,
    set in place: users whose list took an item over the job-wide cap."""
    relevance: torch.Tensor
    items: torch.Tensor
    k: int
    similar: torch.Tensor | None = None
    categories: torch.Tensor | None = None
    num_categories: int = 0
    histories: list | None = None
    shown: torch.Tensor | None = None
    users: int = 0
    filled: torch.Tensor | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    strength: str                             # what `strength` means, for --help-config
    valid: Callable[[float], bool]            # its range
    pick: Callable[[Candidates, object], torch.Tensor]  # (candidates, PolicyConfig) -> picks (B, k)
    needs: frozenset = field(default_factory=frozenset)  # of NEEDS; "job": one actor scores the whole job
    sweep: tuple = ()                         # strengths `evaluate --sweep` tries; () = not swept

    def __post_init__(self):
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"policy {self.name!r} needs {sorted(unknown)}: not among {NEEDS}")


POLICIES = Registry("policy")
register = POLICIES.register


def exposure_capacity(strength: float, users: int) -> int:
    """The exposure policy's cap: the most lists one item may be in, across the job."""
    return max(1, math.ceil(strength * users))


def _needing(c: Candidates, name: str, *what: str) -> None:
    missing = [w for w in what if getattr(c, w) is None]
    if missing:
        raise ValueError(f"policy {name!r} needs {', '.join(missing)} in its Candidates")


def rerank(policy, c: Candidates) -> torch.Tensor:
    """The picks (B, min(k, N)) of `policy` (a PolicyConfig) over a block's candidates: the one
    place the scoring job and the sweep re-rank through."""
    return POLICIES[policy.name].pick(c, policy)


def _similar(c: Candidates, name: str) -> torch.Tensor:
    _needing(c, name, "similar")
    return c.similar[c.items]


def _categories(c: Candidates, name: str) -> torch.Tensor:
    _needing(c, name, "categories")
    return c.categories[c.items]


def _calibration(c: Candidates, p) -> torch.Tensor:
    _needing(c, "calibration", "histories", "categories")
    profile = diversity.category_profile(c.histories, c.categories, c.num_categories)
    return diversity.calibration(c.relevance, _categories(c, "calibration"), profile, c.k, p.strength)


def _exposure(c: Candidates, p) -> torch.Tensor:
    _needing(c, "exposure", "shown")
    return diversity.exposure(c.relevance, c.items, c.k, exposure_capacity(p.strength, c.users), c.shown, c.filled)


register(Policy("none", "ignored", lambda s: True, lambda c, p: diversity.top_k(c.relevance, c.k)))
register(Policy("mmr", "diversity weight in [0, 1] (0 = plain relevance)", lambda s: 0 <= s <= 1,
                lambda c, p: diversity.mmr(c.relevance, _similar(c, "mmr"), c.k, p.strength),
                needs=frozenset({"vectors"}), sweep=(0.0, 0.1, 0.2, 0.3, 0.5, 0.7)))
register(Policy("dpp", "relevance trade-off in [0, 1) (0 = pure diversity, towards 1 relevance dominates)",
                lambda s: 0 <= s < 1,
                lambda c, p: diversity.dpp(c.relevance, _similar(c, "dpp"), c.k, p.strength, p.window),
                needs=frozenset({"vectors"}), sweep=(0.99, 0.95, 0.9, 0.8, 0.6, 0.4)))
register(Policy("category_cap", "most items of one category per list, a whole number >= 1",
                lambda s: s >= 1 and float(s).is_integer(),
                lambda c, p: diversity.category_cap(c.relevance, _categories(c, "category_cap"), c.k, int(p.strength)),
                needs=frozenset({"categories"}), sweep=(10, 5, 3, 2, 1)))
register(Policy("calibration", "weight in [0, 1] (0 = plain relevance)", lambda s: 0 <= s <= 1, _calibration,
                needs=frozenset({"categories", "history"}), sweep=(0.0, 0.2, 0.5, 0.8, 0.95)))
register(Policy(
    "exposure",
    "largest share of the job's users one item may reach, in (0, 1]: a cap of ceil(strength x users) lists per "
    "item across the whole job (one actor scores it; a resumed job counts the parts already written); a user "
    "with too few candidates under the cap gets the most relevant over-cap ones to fill the list, and "
    "summary.json reports the share reached (exposure.max_item_share) and those users "
    "(exposure.users_filled_over_cap)", lambda s: 0 < s <= 1, _exposure, needs=frozenset({"job"})))


def strength_doc() -> str:
    return "by policy - " + POLICIES.describe(lambda p: p.strength)


def swept() -> dict[str, tuple]:
    """The strengths `evaluate --sweep` tries, by policy (those with job-wide state are not swept)."""
    return {p.name: p.sweep for p in POLICIES.values() if p.sweep}
