"""The policy registry (distrec.policies): every registered policy, through the one `rerank`
the scoring job and the sweep call, on one small case whose answer is known by hand."""

import pytest
import torch

from distrec import policies
from distrec.config import ConfigError, load_config
from distrec.score.config import PolicyConfig, ScoreConfig

# Two users, the same three candidates (catalog items 0, 1, 2) with relevance 0.9, 0.8, 0.1.
# Items 0 and 1 are the same thing (identical vectors, category 0); item 2 is unlike them
# (orthogonal, category 1). The users' histories hold one item of each category.
# The answers: relevance alone takes 0 then 1; every diversity policy swaps 1 for 2 (mmr:
# 0.5 x 0.875 - 0.5 x 1 < 0.5 x 0; dpp: 1 adds nothing to 0's volume; category_cap 1; calibration:
# the list 0, 2 matches the 50/50 history); exposure with a cap of one list per item gives
# the first user 0, 1 and the second 2, then 0 as the fill (nothing else is left under the cap).
EXPECTED = {
    "none": ([[0, 1], [0, 1]], 0.5),
    "mmr": ([[0, 2], [0, 2]], 0.5),
    "dpp": ([[0, 2], [0, 2]], 0.5),
    "category_cap": ([[0, 2], [0, 2]], 1),
    "calibration": ([[0, 2], [0, 2]], 0.95),
    "exposure": ([[0, 1], [2, 0]], 0.5),
}


def _case():
    return policies.Candidates(
        relevance=torch.tensor([[0.9, 0.8, 0.1]] * 2), items=torch.tensor([[0, 1, 2]] * 2), k=2,
        similar=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), categories=torch.tensor([0, 0, 1]),
        num_categories=2, histories=[[0, 2], [1, 2]], shown=torch.zeros(3, dtype=torch.long), users=2,
        filled=torch.zeros(2, dtype=torch.bool))


def test_every_policy_has_its_known_case():
    """A policy added to the registry without a case here fails: one place plus its test."""
    assert set(EXPECTED) == set(policies.POLICIES)


@pytest.mark.parametrize("name", list(policies.POLICIES))
def test_policy_picks_through_rerank(name):
    expected, strength = EXPECTED[name]
    case = _case()
    picks = policies.rerank(PolicyConfig(name=name, strength=strength), case)
    assert picks.tolist() == expected
    if name == "exposure":  # job-wide state: counted in place, the over-cap fill reported
        assert case.shown.tolist() == [2, 1, 1]
        assert case.filled.tolist() == [False, True]


@pytest.mark.parametrize("name", list(policies.POLICIES))
def test_policy_without_what_it_needs_says_so(name):
    """A caller that leaves out what a policy needs gets its name, not an IndexError."""
    needs = policies.POLICIES[name].needs
    fields = {"vectors": ["similar"], "categories": ["categories"], "history": ["histories"], "job": ["shown"]}
    for need in needs:
        case = _case()
        for f in fields[need]:
            setattr(case, f, None)
        with pytest.raises(ValueError, match=name):
            policies.rerank(PolicyConfig(name=name, strength=EXPECTED[name][1]), case)


def test_the_config_and_the_sweep_read_the_registry():
    for name, policy in policies.POLICIES.items():
        for strength in policy.sweep:  # every swept strength is one the config accepts
            PolicyConfig(name=name, strength=strength)
        assert f"{name}: {policy.strength}" in policies.strength_doc()
    assert "exposure" not in policies.swept()  # job-wide state: not swept over one block
    with pytest.raises(ConfigError, match="out of range for policy 'category_cap'"):
        load_config(ScoreConfig, None, ["policy.name=category_cap", "policy.strength=1.5"])
    with pytest.raises(ConfigError, match="did you mean 'dpp'"):
        load_config(ScoreConfig, None, ["policy.name=ddp"])


def test_registering_twice_or_an_unknown_need_is_refused():
    with pytest.raises(ValueError, match="twice"):
        policies.register(policies.POLICIES["mmr"])
    with pytest.raises(ValueError, match="needs"):
        policies.Policy("x", "-", lambda s: True, lambda c, p: c.relevance, needs=frozenset({"gpu"}))
