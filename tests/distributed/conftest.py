"""Data and a tiny backbone shared by the multi-process tests (prepared once per session)."""

import pandas as pd
import pytest

from distrec.cli import main
from tests.tiny import tiny_backbone


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    # 240 users, history >= 3 items each: with model.max_len=3 every sample has exactly 3
    # positions, so the mean loss of two ranks is the mean loss of their union; 70 samples
    # per shard: 4 shards that do not divide over the ranks
    assert main(["prepare", "--source", "synthetic", "--out", str(out), "--no-progress", "synthetic.num_users=240",
                 "synthetic.num_items=80", "synthetic.num_categories=4", "synthetic.mean_length=10",
                 "shards.samples_per_shard=70"]) == 0
    return out


@pytest.fixture(scope="session")
def backbone(data_dir, tmp_path_factory):
    texts = pd.read_parquet(data_dir / "items.parquet")["text"].tolist()
    return tiny_backbone(tmp_path_factory.mktemp("bert"), texts, "bert")
