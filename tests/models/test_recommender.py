"""The user tower's fast path for the latest position against the full causal forward."""

import pytest
import torch


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_user_vectors_last_position_path_equals_the_full_sequence(layers):
    """user_vectors runs the last layer for the latest position only; it must equal the state
    the full causal forward (used in training) gives there, with padding and empty histories."""
    from distrec.models.config import ModelConfig
    from distrec.models.recommender import Recommender

    torch.manual_seed(layers)
    model = Recommender(ModelConfig(item_repr="id", dim=16, heads=2, layers=layers, max_len=7), 30).eval()
    history = torch.randint(0, 30, (6, 9))
    history[1, :5] = -1  # short history (left padding)
    history[2, :] = -1  # empty history
    history[3, :8] = -1  # one item
    with torch.no_grad():
        table = model.item_table()
        fast = model.user_vectors(history, table)
        full = model.user_states(history, table)[:, -1]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
