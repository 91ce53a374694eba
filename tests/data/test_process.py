"""Filters, splits and cold-start hold-out on small known logs; determinism; atomic output."""

import hashlib

import numpy as np
import pytest

import distrec.data.prepare as prepare_module
from tests.conftest import write

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def _inter(tmp_path, rows):
    write(tmp_path / "d" / "d.inter", HEADER + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return tmp_path / "d"


def _sequence(data, user):
    test = data.user_row(data.test, user)
    return data.item_ids(list(test["history"]) + [test["target"]])


def test_rating_threshold_dedupe_and_kcore(prepare, tmp_path):
    rows = [("u1", "a", 5, 1), ("u1", "a", 5, 1), ("u1", "b", 4, 2), ("u1", "c", 1, 3), ("u1", "d", 5, 4),
            ("u2", "a", 5, 1), ("u2", "b", 5, 2), ("u2", "d", 4, 3), ("u3", "a", 5, 1), ("u3", "e", 5, 2)]
    folder = _inter(tmp_path, rows)
    data = prepare("recbole", folder, "filter.min_rating=4", "filter.min_item_interactions=2",
                   "filter.min_user_interactions=3")
    steps = data.manifest["steps"]
    assert steps == {"read": 10, "after_rating_filter": 9, "after_dedupe": 8, "after_kcore": 6}
    # e (1 interaction) goes, then u3 has 1 left and goes; a, b, d keep >= 2
    assert sorted(data.users["user_id"]) == ["u1", "u2"] and sorted(data.items["item_id"]) == ["a", "b", "d"]
    assert _sequence(data, "u1") == ["a", "b", "d"]


def test_iterative_kcore_differs_from_once(prepare, tmp_path):
    # q (1 interaction) goes, so u3 keeps only z and goes, so z has 1 interaction left:
    # 'once' stops there; 'iterative' drops z, then u1 (now 2 items), then holds.
    seqs = {"u1": "xyz", "u2": "xyv", "u3": "zq", "u4": "xyv"}
    rows = [(u, i, 5, t) for u, s in seqs.items() for t, i in enumerate(s)]
    args = ("filter.min_item_interactions=2", "filter.min_user_interactions=3")
    once = prepare("recbole", _inter(tmp_path, rows), *args, "filter.kcore=once", out=tmp_path / "once")
    iterative = prepare("recbole", _inter(tmp_path, rows), *args, out=tmp_path / "it")
    assert sorted(once.items["item_id"]) == ["v", "x", "y", "z"]
    assert sorted(once.users["user_id"]) == ["u1", "u2", "u4"]
    assert sorted(iterative.items["item_id"]) == ["v", "x", "y"]
    assert sorted(iterative.users["user_id"]) == ["u2", "u4"]


def test_short_users_train_only(prepare, tmp_path):
    rows = [("u1", "a", 5, 1), ("u1", "b", 5, 2), ("u1", "c", 5, 3), ("u2", "a", 5, 1), ("u2", "b", 5, 2)]
    data = prepare("recbole", _inter(tmp_path, rows))
    assert data.manifest["splits"]["test"]["users"] == 1 and data.manifest["notes"]["users_without_test"] == 1
    assert data.manifest["splits"]["train"]["interactions"] == 1 + 2  # u1: a; u2: a, b


def test_global_time_split(prepare, tmp_path):
    # 20 interactions at t = 0..19; val = [16, 18), test = [18, 20) by the 10% / 10% quantiles
    rows = [(f"u{t % 3}", f"i{t}", 5, t) for t in range(20)]
    data = prepare("recbole", _inter(tmp_path, rows), "split.mode=time")
    test = {data.users["user_id"][u]: (data.item_ids(h), data.item_ids([t])[0])
            for u, h, t in data.test[["user", "history", "target"]].itertuples(index=False)}
    # u0 has t = 0,3,...,18: first test-period item i18, history all earlier
    assert test["u0"] == (["i0", "i3", "i6", "i9", "i12", "i15"], "i18")
    assert test["u1"] == (["i1", "i4", "i7", "i10", "i13", "i16"], "i19")
    val = {data.users["user_id"][u]: data.item_ids([t])[0] for u, t in data.val[["user", "target"]].itertuples(index=False)}
    assert val == {"u1": "i16", "u2": "i17"}
    assert data.manifest["splits"]["train"]["interactions"] == 16


def test_time_split_needs_timestamps(cli, tmp_path):
    write(tmp_path / "p" / "sequential_data.txt", "1 1 2 3\n")
    write(tmp_path / "p" / "datamaps.json", '{"user2id": {"A": "1"}, "item2id": {"X": "1", "Y": "2", "Z": "3"}}')
    write(tmp_path / "p" / "d.item", "item_id:token\ttitle:token\nX\tx\nY\ty\nZ\tz\n")
    code, err = cli("prepare", "--source", "p5", "--input", tmp_path / "p", "--out", tmp_path / "o", "split.mode=time")
    assert code == 2 and "split.mode=time needs timestamps" in err


def test_cold_items_only_as_test_targets(prepare):
    data = prepare("synthetic", None, "synthetic.num_users=300", "synthetic.num_items=200",
                   "synthetic.new_item_fraction=0", "split.cold_item_fraction=0.2", "split.seed=7")
    held = set(data.items.index[data.items["held_out"]])
    assert len(held) == 40
    for frame in (data.val, data.test):
        assert not any(held & set(h) for h in frame["history"])
    assert not held & set(data.val["target"])
    assert (data.items["train_count"][list(held)] == 0).all()
    cold = data.test["cold_target"].to_numpy()
    assert cold.sum() > 0 and set(data.test["target"][cold]) <= held
    # training shards never mention a held-out item
    import json, tarfile
    for shard in data.manifest["shards"]:
        with tarfile.open(data.out / shard["path"]) as tar:
            for member in tar:
                record = json.loads(tar.extractfile(member).read())
                assert not held & set(record["history"] + [record["target"]])


def test_synthetic_text_predicts_behaviour(prepare):
    data = prepare("synthetic", None, "synthetic.num_users=400", "synthetic.num_items=300",
                   "synthetic.num_categories=6")
    items = data.items
    category = items["categories"].map(lambda c: c[0])
    # every title word but the last (generic) word belongs to one category only
    owners = {}
    for title, cat in zip(items["title"], category):
        for word in title.split()[:-1]:
            owners.setdefault(word, set()).add(cat)
    assert all(len(c) == 1 for c in owners.values())
    # users concentrate on few categories: far from a uniform mix of 6
    top_share = [np.bincount(category.factorize()[0][h], minlength=6).max() / len(h) for h in data.test["history"]]
    assert np.mean(top_share) > 0.5
    # the generator's 15 new items occur only as final interactions: some users' test
    # targets, never in a training shard, a validation target or any history
    assert data.manifest["notes"]["synthetic_new_items"] == 15
    cold_targets = set(data.test["target"][data.test["cold_target"]])
    assert 0 < len(cold_targets) <= 15
    seen = set(data.val["target"]) | {i for h in data.test["history"] for i in h}
    import json, tarfile
    for shard in data.manifest["shards"]:
        with tarfile.open(data.out / shard["path"]) as tar:
            for member in tar:
                record = json.loads(tar.extractfile(member).read())
                seen |= set(record["history"]) | {record["target"]}
    assert not cold_targets & seen


def test_exact_dedupe_keeps_repeats_without_timestamps(prepare, tmp_path):
    write(tmp_path / "p" / "sequential_data.txt", "1 1 2 1 3 1\n")
    write(tmp_path / "p" / "datamaps.json", '{"user2id": {"A": "1"}, "item2id": {"X": "1", "Y": "2", "Z": "3"}}')
    write(tmp_path / "p" / "d.item", "item_id:token\ttitle:token\nX\tx\nY\ty\nZ\tz\n")
    data = prepare("p5", tmp_path / "p")
    assert data.manifest["num_interactions"] == 5  # a repeat is real behaviour when order is all we have
    assert _sequence(data, "A") == ["X", "Y", "X", "Z", "X"]
    first = prepare("p5", tmp_path / "p", "filter.dedupe=first", out=tmp_path / "first")
    assert _sequence(first, "A") == ["X", "Y", "Z"]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "manifest.json"}


def test_rerun_is_byte_identical(prepare, tmp_path):
    a = prepare("synthetic", None, "synthetic.num_users=200", "shards.samples_per_shard=64", out=tmp_path / "a")
    first = _digest(a.out)
    b = prepare("synthetic", None, "synthetic.num_users=200", "shards.samples_per_shard=64", out=tmp_path / "a")
    assert len(a.manifest["shards"]) == 4 and len(first) == 10  # the marker .distrec-output.json included
    assert _digest(b.out) == first
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]


def test_crash_midway_leaves_no_complete_looking_directory(cli, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert cli("prepare", "--source", "synthetic", "--out", out, "synthetic.num_users=50")[0] == 0
    before = _digest(out)

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prepare_module, "write_shards", explode)
    with pytest.raises(RuntimeError):
        cli("prepare", "--source", "synthetic", "--out", out, "--overwrite", "synthetic.num_users=60")
    assert _digest(out) == before  # the previous good output is intact
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging directory left behind
    with pytest.raises(RuntimeError):
        cli("prepare", "--source", "synthetic", "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_prefix_samples(prepare, tmp_path):
    rows = [("u1", c, 5, t) for t, c in enumerate("abcdef")]
    data = prepare("recbole", _inter(tmp_path, rows), "shards.samples=prefix", "shards.max_history=2")
    import json, tarfile
    with tarfile.open(data.out / data.manifest["shards"][0]["path"]) as tar:
        records = sorted((json.loads(tar.extractfile(m).read()) for m in tar), key=lambda r: r["target"])
    ids = lambda xs: data.item_ids(xs)  # noqa: E731
    # train part is a b c d (e = val, f = test); targets b, c, d with at most 2 history items
    assert [(ids(r["history"]), ids([r["target"]])[0]) for r in records] == [(["a"], "b"), (["a", "b"], "c"), (["b", "c"], "d")]
