"""The training objectives and their registry (distrec.models.losses): each registered
loss on a case computed by hand, through the `compute` that Recommender.forward calls."""

import pytest
import torch

from distrec.config import ConfigError, load_config
from distrec.models import losses
from distrec.models.losses import Objective, binary_cross_entropy, full_softmax, sampled_softmax
from distrec.train.config import TrainConfig

STATES = torch.tensor([[1.0, 0.0]])
TABLE = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
LABELS = torch.tensor([0])
SOFTMAX = torch.nn.functional.softplus(torch.tensor(-2.0))  # -log(e^2 / (e^2 + e^0))


def _bce_by_hand(seed: int, pos_weight: float) -> torch.Tensor:
    torch.manual_seed(seed)
    negative = torch.randint(0, 2, (1, 1)).item()
    pos = torch.nn.functional.softplus(torch.tensor(-2.0))  # -log sigmoid(2)
    if negative == 0:  # the negative drew the positive: masked out
        return pos
    return (pos_weight * pos + torch.log(torch.tensor(2.0))) / (pos_weight + 1.0)  # logit 0 -> log 2


# name -> (objective, expected loss on STATES/TABLE/LABELS, the seed drawn before)
KNOWN = {
    "softmax": (Objective("softmax"), lambda: SOFTMAX),
    # every item a candidate (2,000 draws of 2 items), no log-q: the full softmax
    "sampled_softmax": (Objective("sampled_softmax", num_negatives=2000, log_q=torch.zeros(2)), lambda: SOFTMAX),
    "bce": (Objective("bce", bce_negatives=1, pos_weight=3.0), lambda: _bce_by_hand(0, 3.0)),
}


def test_every_loss_has_its_known_case():
    """A loss added to the registry without a case here fails: one place plus its test."""
    assert set(KNOWN) == set(losses.LOSSES)


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_loss_through_the_registry_matches_hand_computation(name):
    objective, expected = KNOWN[name]
    torch.manual_seed(0)
    loss = losses.compute(STATES, LABELS, TABLE, objective)
    torch.testing.assert_close(loss, expected())


def test_sampled_softmax_equals_full_softmax_when_every_item_is_a_candidate():
    torch.manual_seed(0)
    states, table = torch.randn(6, 4), torch.randn(9, 4)
    labels = torch.tensor([0, 3, 3, 8, 1, 2])
    full = full_softmax(states, labels, table)
    sampled = sampled_softmax(states, labels, table, num_negatives=2000, log_q=torch.zeros(9))
    torch.testing.assert_close(sampled, full)


def test_sampled_softmax_log_q_lowers_a_popular_candidates_pull():
    """log-q: subtracting log q from a popular item's logit makes it a weaker negative."""
    states, table = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    plain = sampled_softmax(states, torch.tensor([0]), table, 2000, torch.zeros(2))
    corrected = sampled_softmax(states, torch.tensor([0]), table, 2000, torch.log(torch.tensor([0.5, 0.9])))
    assert corrected < plain  # item 1 (q 0.9) is pushed against less than item 0 (q 0.5) is lifted


def test_bce_matches_hand_computation():
    torch.manual_seed(0)
    loss = binary_cross_entropy(STATES, LABELS, TABLE, negatives_per_positive=1, pos_weight=3.0)
    torch.testing.assert_close(loss, _bce_by_hand(0, 3.0))


def test_the_config_reads_the_registry():
    for name, loss in losses.LOSSES.items():
        assert load_config(TrainConfig, None, [f"train.loss={name}"]).train.loss == name
        assert f"{name}: {loss.doc}" in losses.loss_doc()
    with pytest.raises(ConfigError, match="did you mean 'bce'"):
        load_config(TrainConfig, None, ["train.loss=bse"])
    with pytest.raises(ValueError, match="twice"):
        losses.register(losses.LOSSES["bce"])


def test_a_loss_registered_by_a_test_alone_trains_a_model(data_dir, tmp_path, monkeypatch):
    """One registry entry and nothing else: the config accepts it and `distrec train` optimises
    it (its first logged loss is twice the full softmax of the same first step: the pinned curve)."""
    import json

    from distrec.cli import main
    from tests.train.test_pinned_curves import COMMON, PINNED, SETUPS

    calls = []

    def doubled(states, labels, table, objective):
        calls.append(len(labels))
        return 2 * full_softmax(states, labels, table)

    monkeypatch.setitem(losses.LOSSES, "doubled", losses.Loss("doubled", "twice the full softmax", doubled))
    assert load_config(TrainConfig, None, ["train.loss=doubled"]).train.loss == "doubled"
    run = tmp_path / "run"
    args = ["train", "--no-progress", f"data.dir={data_dir}", f"run.dir={run}", *COMMON, *SETUPS["id"],
            "train.loss=doubled"]
    assert main(args) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in records if r["event"] == "train")
    assert first == pytest.approx(2 * PINNED["id"][0], rel=1e-5)
    assert len(calls) >= 8  # every step went through the registered function
