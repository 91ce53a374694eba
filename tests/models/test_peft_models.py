"""Every PEFT method on an encoder and a decoder backbone: what trains, one step, and a
save -> load round trip that gives the same scores."""

import pandas as pd
import pytest
import torch

from distrec.config import ConfigError
from distrec.models.config import ModelConfig, PeftConfig
from distrec.models.losses import binary_cross_entropy, full_softmax, sampled_softmax
from distrec.models.peft_methods import adalora_apply_masks, adalora_update_importance, count_parameters
from distrec.models.run import build_model, load_model, save_model
from tests.tiny import tiny_backbone

TEXTS = ["red apple pie", "green apple", "blue berry jam", "dark chocolate cake", "lemon tart",
         "apple crumble", "berry smoothie", "chocolate milk"]
METHODS = ["lora", "adalora", "adapter", "full", "frozen"]


@pytest.fixture(scope="module")
def items():
    return pd.DataFrame({"item_id": [f"i{i}" for i in range(len(TEXTS))], "text": TEXTS})


@pytest.fixture(scope="module", params=["bert", "llama"])
def backbone_dir(request, tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp(request.param), TEXTS, request.param)


def _model(backbone_dir, items, method, item_repr="text"):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone_dir, item_repr=item_repr, dim=16, max_len=8, heads=2, dropout=0.0)
    model, tokenizer = build_model(cfg, PeftConfig(method=method, r=2, adalora_init_r=4, adapter_size=4), items, 20)
    model.refresh_cache()
    return model, tokenizer


def _batch():
    return torch.tensor([[-1, 0, 1], [2, 3, 4]]), torch.tensor([2, 5])


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_what_it_should_and_reloads_exactly(backbone_dir, items, method, tmp_path):
    model, tokenizer = _model(backbone_dir, items, method)
    backbone_trainable, backbone_total = count_parameters(model.backbone)
    if method == "frozen":
        assert backbone_trainable == 0
    elif method == "full":
        assert backbone_trainable == backbone_total
    else:
        assert 0 < backbone_trainable < backbone_total / 2
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history, target = _batch()
    live = torch.tensor([2, 5, 7])
    loss, live_pooled, regulariser = model(history, target, live if backbone_trainable else None)
    assert (float(regulariser) > 0) == (method == "adalora")  # AdaLoRA's orthogonality term, in the forward
    (loss + regulariser).backward()
    adalora_update_importance(model.backbone, 0)
    optimizer.step()
    adalora_apply_masks(model.backbone, 0)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained_before[n])}
    assert any(n.startswith("backbone.") for n in changed) == (method != "frozen")
    assert any(n.startswith("user_tower.") for n in changed) and "project.weight" in changed

    model.eval()
    model.refresh_cache()
    with torch.no_grad():
        table = model.item_table()
        users = model.user_vectors(history, table)
    save_model(model, tmp_path / "ckpt", PeftConfig(method=method, r=2, adalora_init_r=4, adapter_size=4),
               list(items["item_id"]))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    again = load_model(tmp_path / "ckpt", items, tmp_path / "tok")
    again.eval()
    again.refresh_cache()
    with torch.no_grad():
        torch.testing.assert_close(again.item_table(), table)
        torch.testing.assert_close(again.user_vectors(history, again.item_table()), users)


def test_unknown_target_module_is_a_config_error(backbone_dir, items):
    cfg = ModelConfig(backbone=backbone_dir, dim=16, max_len=8, heads=2)
    with pytest.raises(ConfigError, match="peft.target_modules"):
        build_model(cfg, PeftConfig(method="lora", target_modules=["no_such_layer"]), items, 10)
    with pytest.raises(ConfigError, match="peft.target_modules"):
        build_model(cfg, PeftConfig(method="adapter", target_modules=["no_such_layer"]), items, 10)


def test_missing_backbone_is_a_config_error(items, tmp_path):
    cfg = ModelConfig(backbone=str(tmp_path / "nothing-here"), dim=16, max_len=8, heads=2)
    with pytest.raises(ConfigError, match="model.backbone=.*cannot load it"):
        build_model(cfg, PeftConfig(), items, 10)


def test_id_model_new_items_keep_old_vectors(tmp_path, items):
    torch.manual_seed(0)
    cfg = ModelConfig(item_repr="id", dim=8, max_len=8, heads=2)
    model, _ = build_model(cfg, PeftConfig(), items, 10)
    save_model(model, tmp_path / "ckpt", PeftConfig(), list(items["item_id"]))
    grown = pd.DataFrame({"item_id": ["new"] + list(items["item_id"]), "text": [""] * (len(items) + 1)})
    again = load_model(tmp_path / "ckpt", grown)
    torch.testing.assert_close(again.item_embedding.weight[1:], model.item_embedding.weight)
    assert again.item_embedding.weight[0].abs().sum() == 0


def test_corrupt_checkpoint_is_a_config_error(tmp_path, items):
    model, _ = build_model(ModelConfig(item_repr="id", dim=8, heads=2), PeftConfig(), items, 10)
    save_model(model, tmp_path / "ckpt", PeftConfig(), list(items["item_id"]))
    (tmp_path / "ckpt" / "heads.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        load_model(tmp_path / "ckpt", items)


def test_sampled_softmax_equals_full_softmax_when_every_item_is_a_candidate():
    torch.manual_seed(0)
    states, table = torch.randn(6, 4), torch.randn(9, 4)
    labels = torch.tensor([0, 3, 3, 8, 1, 2])
    full = full_softmax(states, labels, table)
    sampled = sampled_softmax(states, labels, table, num_negatives=2000, log_q=torch.zeros(9))
    torch.testing.assert_close(sampled, full)


def test_bce_matches_hand_computation():
    states = torch.tensor([[1.0, 0.0]])
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    torch.manual_seed(0)
    loss = binary_cross_entropy(states, torch.tensor([0]), table, negatives_per_positive=1, pos_weight=3.0)
    torch.manual_seed(0)
    negative = torch.randint(0, 2, (1, 1)).item()
    pos = torch.nn.functional.softplus(torch.tensor(-2.0))  # -log sigmoid(2)
    if negative == 0:  # the negative drew the positive: masked out
        expected = pos
    else:  # logit 0 -> log 2
        expected = (3.0 * pos + torch.log(torch.tensor(2.0))) / 4.0
    torch.testing.assert_close(loss, expected)


def test_text_plus_id_scores_unseen_items_by_text_alone(backbone_dir, items):
    seen_items = items.assign(train_count=[3, 0, 1, 1, 0, 2, 1, 1])
    model, _ = build_model(ModelConfig(backbone=backbone_dir, item_repr="text+id", dim=16, heads=2),
                           PeftConfig(method="lora", r=2), seen_items, 10)
    model.refresh_cache()
    with torch.no_grad():
        model.item_embedding.weight.fill_(5.0)
        table = model.item_table()
        text_only = model.project(model.pooled_cache)
    torch.testing.assert_close(table[[1, 4]], text_only[[1, 4]])  # never trained: text alone
    torch.testing.assert_close(table[[0, 2]], text_only[[0, 2]] + 5.0)
