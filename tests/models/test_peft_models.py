"""Every PEFT method on an encoder and a decoder backbone: what trains, one step, and a
save -> load round trip that gives the same scores."""

import pandas as pd
import pytest
import torch

from distrec.config import ConfigError
from distrec.models.config import ModelConfig, PeftConfig
from distrec.models import peft_methods
from distrec.models.peft_methods import adalora_apply_masks, adalora_update_importance, count_parameters
from distrec.models.run import build_model, load_model, save_model
from tests.tiny import tiny_backbone

TEXTS = ["red apple pie", "green apple", "blue berry jam", "dark chocolate cake", "lemon tart",
         "apple crumble", "berry smoothie", "chocolate milk"]
METHODS = list(peft_methods.METHODS)  # every registered method: a new one is tested here without a new list


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
    assert (float(regulariser.detach()) > 0) == (method == "adalora")  # AdaLoRA's orthogonality term, in the forward
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


def test_the_config_reads_the_registry():
    from distrec.config import load_config
    from distrec.train.config import TrainConfig

    for name, method in peft_methods.METHODS.items():
        assert load_config(TrainConfig, None, [f"peft.method={name}"]).peft.method == name
        assert f"{name}: {method.doc}" in peft_methods.method_doc()
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        load_config(TrainConfig, None, ["peft.method=lroa"])
    with pytest.raises(ValueError, match="twice"):
        peft_methods.register(peft_methods.METHODS["lora"])


def test_only_adalora_has_step_hooks_and_unreached_weights(backbone_dir, items):
    """The trainer calls hooks, never names: AdaLoRA's live in its entry, the rest have none,
    and a model reports the weights ZeRO-3 must keep whole through its method."""
    for name, method in peft_methods.METHODS.items():
        hooked = [h for h in ("after_backward", "after_step", "regulariser", "unreached") if getattr(method, h)]
        assert hooked == ([] if name != "adalora" else ["after_backward", "after_step", "regulariser", "unreached"])
    ada, _ = _model(backbone_dir, items, "adalora")
    lora, _ = _model(backbone_dir, items, "lora")
    assert ada.peft is peft_methods.METHODS["adalora"] and lora.peft is peft_methods.METHODS["lora"]
    unreached = ada.unreached_params()
    assert unreached and all(any(k in n for k in ("lora_A", "lora_B", "lora_E", "ranknum"))
                             for n, p in ada.backbone.named_parameters() if any(p is q for q in unreached))
    assert lora.unreached_params() == []
