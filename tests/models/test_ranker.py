"""The cross-encoder ranker: its input layout on a known case, scores independent of the
batch they are computed in, the retrieval correction, both objectives, and a saved
ranker that reloads (PeftModel.from_pretrained) to identical scores."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from distrec.config import ConfigError
from distrec.models.backbone import load_backbone
from distrec.models.config import ModelConfig, PeftConfig
from distrec.models.ranker import RankerConfig
from distrec.models.run import build_model, load_model, save_model


def _ranker(data_dir, backbone, **cfg):
    items = pd.read_parquet(data_dir / "items.parquet")
    model_cfg = ModelConfig(kind="ranker", backbone=backbone)
    model, tokenizer = build_model(model_cfg, PeftConfig(method="lora", r=2), items, 10,
                                   ranker_cfg=RankerConfig(**{"item_tokens": 4, "history_tokens": 10,
                                                              "history_items": 3, "per_pass": 3, **cfg}))
    return model.eval(), tokenizer, items


def test_a_pass_reads_the_newest_history_first_then_each_candidate_before_its_marker(data_dir, backbone):
    model, tokenizer, _ = _ranker(data_dir, backbone, history_tokens=100)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids, mask, markers, starts, owners, size = model.passes([[0, 1, 2]], torch.tensor([[5, 6, 7, 8]]))
    # 4 candidates at per_pass 3 -> 2 even passes of 2
    assert size == 2 and owners == [(0, 0), (0, 2)]
    item = model.items
    head = [cls] + item[2] + [sep] + item[1] + [sep] + item[0] + [sep] + [sep]
    first = head + item[5] + [sep] + item[6] + [sep]
    assert ids[0, :len(first)].tolist() == first and int(mask[0].sum()) == len(first)
    assert markers[0].tolist() == [len(head) + len(item[5]), len(first) - 1]
    assert starts[0].tolist() == [len(head), len(head) + len(item[5]) + 1]
    assert all(ids[0, m] == sep for m in markers[0].tolist())


def test_the_history_budget_cuts_the_oldest_items(data_dir, backbone):
    model, tokenizer, _ = _ranker(data_dir, backbone, history_tokens=len(_ranker(data_dir, backbone)[0].items[9]) + 1)
    assert model.history_tokens([3, 4, 9]) == model.items[9] + [tokenizer.sep_token_id]
    newest_last, _, _ = _ranker(data_dir, backbone, history_tokens=100, history_order="newest_last")
    sep = tokenizer.sep_token_id
    assert newest_last.history_tokens([3, 9]) == newest_last.items[3] + [sep] + newest_last.items[9] + [sep]


def test_scores_do_not_depend_on_the_batch_or_its_padding(data_dir, backbone):
    model, _, _ = _ranker(data_dir, backbone)
    histories = [[1, 2, 3, 4, 5], [7]]
    candidates = torch.tensor([[10, 11, 12, 13], [20, 21, -1, -1]])
    together = model.score(histories, candidates)
    alone = torch.cat([model.score(histories[:1], candidates[:1]), model.score(histories[1:], candidates[1:])])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(together[1, 2:]).all() and torch.isfinite(together[0]).all()


def test_with_the_head_at_zero_the_ranker_orders_as_the_retriever(data_dir, backbone):
    model, _, _ = _ranker(data_dir, backbone, retrieval_scale=20.0)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    retrieval = torch.tensor([[0.1, 0.5, -0.2, 0.3]])
    scores = model.score([[1, 2]], torch.tensor([[4, 5, 6, 7]]), retrieval)
    torch.testing.assert_close(scores, 20.0 * retrieval)


@pytest.mark.parametrize("objective", ["listwise", "pointwise"])
def test_both_objectives_learn_to_put_the_target_first(objective, data_dir, backbone):
    torch.manual_seed(0)
    model, _, _ = _ranker(data_dir, backbone, objective=objective, shuffle=False)
    model.train()
    history = torch.tensor([[-1, 1, 2], [3, 4, 5]])
    candidates = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    target = torch.tensor([12, 20])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    first = None
    for _ in range(30):
        loss, _, regulariser = model(history, target, candidates)
        first = float(loss) if first is None else first
        optimizer.zero_grad()
        (loss + regulariser).backward()
        optimizer.step()
    assert float(loss) < 0.5 * first
    model.eval()
    scores = model.score([[1, 2], [3, 4, 5]], candidates)
    assert scores.argmax(1).tolist() == [2, 0]


def test_a_saved_ranker_reloads_to_identical_scores(data_dir, backbone, tmp_path):
    model, tokenizer, items = _ranker(data_dir, backbone)
    with torch.no_grad():  # move the adapters off their zero start, so reloading them matters
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    save_model(model, tmp_path / "best", PeftConfig(method="lora", r=2), list(items["item_id"]))
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    assert (tmp_path / "best" / "adapter" / "adapter_config.json").is_file()
    again = load_model(tmp_path / "best", items, tmp_path / "tokenizer").eval()
    histories, candidates = [[1, 2, 3], [4]], torch.tensor([[5, 6, 7], [8, 9, 10]])
    torch.testing.assert_close(again.score(histories, candidates), model.score(histories, candidates))
    fresh, _, _ = _ranker(data_dir, backbone)
    assert not torch.allclose(fresh.score(histories, candidates), model.score(histories, candidates))
    with pytest.raises(ConfigError, match="another catalog"):
        load_model(tmp_path / "best", items.iloc[:-1], tmp_path / "tokenizer")


def test_a_pass_longer_than_the_backbone_reads_is_refused_in_one_line(data_dir, backbone):
    model, _, _ = _ranker(data_dir, backbone, item_tokens=40, per_pass=30, history_tokens=0)
    long_items = torch.tensor([list(range(30))])
    with pytest.raises(ConfigError, match="above the backbone's 128: lower ranker.per_pass"):
        model.score([[1]], long_items)


def test_a_decoder_backbone_ranks_too(data_dir, tmp_path):
    from tests.tiny import tiny_backbone

    texts = pd.read_parquet(data_dir / "items.parquet")["text"].tolist()
    llama = tiny_backbone(tmp_path / "llama", texts, "llama")
    model, _, _ = _ranker(data_dir, llama)
    scores = model.score([[1, 2], [3]], torch.tensor([[4, 5, 6], [7, 8, -1]]))
    assert scores.shape == (2, 3) and torch.isfinite(scores[0]).all() and torch.isneginf(scores[1, 2])
    _, tokenizer = load_backbone(llama)
    assert model.sep == (tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id)


def test_an_encoder_reads_each_candidate_as_the_mean_of_its_span_a_decoder_at_its_separator(data_dir, backbone,
                                                                                             tmp_path):
    from tests.tiny import tiny_backbone

    texts = pd.read_parquet(data_dir / "items.parquet")["text"].tolist()
    for path, pooling in ((backbone, "mean"), (tiny_backbone(tmp_path / "llama", texts, "llama"), "last")):
        model, _, _ = _ranker(data_dir, path)
        assert model.pooling == pooling
        histories, candidates = [[1, 2]], torch.tensor([[4, 5, 6]])
        ids, mask, markers, starts, _, _ = model.passes(histories, candidates)
        with torch.no_grad():
            hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[0]
            expected = [model.head(hidden[s:e + 1].mean(0) if pooling == "mean" else hidden[e]).item()
                        for s, e in zip(starts[0].tolist(), markers[0].tolist())]
        torch.testing.assert_close(model.score(histories, candidates)[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
