"""Shard reading: every sample exactly once per epoch, equal steps on every rank, checked
against brute force on many shapes, across DataLoader workers, and on 2 gloo processes."""

import json
import os
import re
import tarfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from distrec.formats import DataError
from distrec.data.shards import EpochPlan, ShardedSamples, collate, left_pad


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8), world=st.integers(1, 4),
       batch=st.integers(2, 9), epoch=st.integers(0, 3))
def test_plan_is_exact_once_with_equal_steps(sizes, world, batch, epoch):
    total = sum(sizes)
    try:
        plan = EpochPlan(sizes, world, batch, epoch=epoch, seed=1)
    except DataError:
        # only refused when some step would leave a rank without a sample
        steps = max(1, -(-total // (world * batch)))
        assert total // steps < world
        return
    seen = []
    for rank in range(world):
        sizes_r = plan.batch_sizes(rank)
        assert len(sizes_r) == plan.steps and sizes_r.min() >= 1 and sizes_r.max() <= batch
        assert sizes_r.max() - sizes_r.min() <= 1
        for step in range(plan.steps):
            seen += [tuple(r) for r in plan.step_samples(rank, step)]
    expected = [(s, p) for s, n in enumerate(sizes) for p in range(n)]
    assert sorted(seen) == expected  # every sample once, none twice


@settings(max_examples=100, deadline=None)
@given(total=st.integers(8, 200), world=st.integers(2, 4), batch=st.integers(1, 9), epoch=st.integers(0, 3))
def test_a_step_holds_the_same_samples_whatever_the_world_size(total, world, batch, epoch):
    """The ranks' batches at a step together are the one-process batch at world x batch."""
    try:
        many = EpochPlan([total // 2, total - total // 2], world, batch, epoch=epoch, seed=3)
    except DataError:
        return
    one = EpochPlan([total // 2, total - total // 2], 1, world * batch, epoch=epoch, seed=3)
    assert one.steps == many.steps
    for step in range(one.steps):
        union = np.concatenate([many.step_samples(rank, step) for rank in range(world)])
        assert union.tolist() == one.step_samples(0, step).tolist()


def test_epochs_reshuffle_and_unshuffled_is_file_order():
    a, b = EpochPlan([5, 5], 1, 4, epoch=0), EpochPlan([5, 5], 1, 4, epoch=1)
    assert not np.array_equal(a.order, b.order)
    plain = EpochPlan([2, 3], 1, 4, shuffle=False)
    assert plain.order.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]


def test_collate_left_pads_and_truncates():
    batch = collate([{"key": "a", "user": 1, "history": [5, 6, 7], "target": 8},
                     {"key": "b", "user": 2, "history": [9], "target": 3}], max_history=2)
    assert batch["history"].tolist() == [[6, 7], [-1, 9]]
    assert batch["length"].tolist() == [2, 1] and batch["target"].tolist() == [8, 3]
    assert batch["keys"] == ["a", "b"] and batch["user"].tolist() == [1, 2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """203 synthetic users in shards of 40: 6 shards, the last with 3 samples."""
    from distrec.cli import main

    out = tmp_path_factory.mktemp("shards") / "data"
    assert main(["prepare", "--source", "synthetic", "--out", str(out), "--no-progress",
                 "synthetic.num_users=203", "synthetic.num_items=150", "shards.samples_per_shard=40"]) == 0
    return out


def _all_keys(out: Path) -> list[str]:
    keys = []
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            keys += [m.name.split(".")[0] for m in tar]
    return keys


def test_loader_workers_yield_plan_order_and_resume(dataset):
    reference = ShardedSamples(dataset, batch_size=16, seed=5)
    reference.set_epoch(2)
    plain = [b["keys"] for b in reference]
    assert len(plain) == len(reference) == 13 and sorted(sum(plain, [])) == sorted(_all_keys(dataset))
    with_workers = [b["keys"] for b in DataLoader(reference, batch_size=None, num_workers=2)]
    assert with_workers == plain  # workers interleave back into the planned order
    reference.set_epoch(2, start_step=5)
    resumed = [b["keys"] for b in DataLoader(reference, batch_size=None, num_workers=2)]
    assert resumed == plain[5:]
    # the samples' content is what prepare wrote
    first = next(iter(ShardedSamples(dataset, batch_size=4, shuffle=False)))
    assert first["history"].shape[0] == 4 and (first["target"] >= 0).all()


def test_corrupt_shard_is_named(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shard = copy / "train-00002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00002.tar: checksum does not match the manifest"):
        for _ in ShardedSamples(copy, batch_size=16, shuffle=False):
            pass
    shard.write_bytes(bytes(data[:3000]))  # truncated, checksum not verified: still named
    with pytest.raises(DataError, match=r"train-00002.tar: (not a readable tar|holds \d+ samples)"):
        for _ in ShardedSamples(copy, batch_size=16, shuffle=False, verify=False):
            pass


def test_prepare_verify_names_the_shard_and_the_sample(dataset, tmp_path, capsys):
    """`distrec prepare --verify DIR`: ok with the counts on a good dataset; a flipped byte,
    a sample whose item is out of range (checksum made to match), a missing shard and a
    missing table each fail with exit 2 and the file (and sample) named."""
    import hashlib
    import io
    import shutil

    from distrec.cli import main

    assert main(["prepare", "--verify", str(dataset)]) == 0
    assert "ok, 6 shards with 203 samples match the manifest; 149 items" in capsys.readouterr().out

    def broken(name):
        copy = tmp_path / name
        shutil.copytree(dataset, copy)
        return copy

    def check(copy, pattern):
        assert main(["prepare", "--verify", str(copy)]) == 2
        assert re.search(pattern, capsys.readouterr().err), pattern

    copy = broken("flipped")
    data = bytearray((copy / "train-00001.tar").read_bytes())
    data[900] ^= 0x01
    (copy / "train-00001.tar").write_bytes(bytes(data))
    check(copy, r"train-00001.tar: checksum does not match the manifest")

    copy = broken("out_of_range")
    shard = copy / "train-00003.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, (member, payload) in enumerate(members):
            if i == 4:
                record = json.loads(payload)
                record["target"] = 10_000
                payload = json.dumps(record).encode()
                member.size = len(payload)
                bad_key = member.name.partition(".")[0]
            tar.addfile(member, io.BytesIO(payload))
    shard.write_bytes(buffer.getvalue())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][3]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    check(copy, rf"train-00003.tar: sample {bad_key} names an item outside 0..148")

    copy = broken("missing_shard")
    (copy / "train-00005.tar").unlink()
    check(copy, r"train-00005.tar: missing; the manifest lists it, so the dataset .* is incomplete")

    copy = broken("missing_table")
    (copy / "test.parquet").unlink()
    check(copy, r"test.parquet: unreadable")


def _rank_main(rank, world, init_file, data_dir, result_file):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    dataset = ShardedSamples(data_dir, batch_size=16, rank=rank, world_size=world, seed=3)
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        keys, steps = [], 0
        for batch in DataLoader(dataset, batch_size=None, num_workers=2):
            # a collective every step, as DDP does: a rank short of a batch would hang here
            count = torch.tensor([len(batch["keys"])])
            dist.all_reduce(count)
            keys += batch["keys"]
            steps += 1
        gathered = [None] * world
        dist.all_gather_object(gathered, {"steps": steps, "planned": len(dataset), "keys": keys})
        epochs.append(gathered)
    if rank == 0:
        Path(result_file).write_text(json.dumps(epochs))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_gloo_ranks_two_workers_each_see_every_sample_once(dataset, tmp_path):
    result = tmp_path / "result.json"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(dataset), str(result)), nprocs=2, join=True)
    epochs = json.loads(result.read_text())
    expected = sorted(_all_keys(dataset))
    assert len(expected) == 203
    for ranks in epochs:
        assert [r["steps"] for r in ranks] == [r["planned"] for r in ranks] == [7, 7]
        seen = ranks[0]["keys"] + ranks[1]["keys"]
        assert sorted(seen) == expected  # exactly once across ranks and workers
        assert len(ranks[0]["keys"]) == 102 and len(ranks[1]["keys"]) == 101
    assert epochs[0][0]["keys"] != epochs[1][0]["keys"]  # a new order each epoch


def test_left_pad_equals_a_row_by_row_reference():
    def reference(histories, max_history):
        kept = [list(h)[-max_history:] if max_history else list(h) for h in histories]
        width = max([len(h) for h in kept] + [1])
        return [[-1] * (width - len(h)) + h for h in kept]

    rng = np.random.default_rng(0)
    for _ in range(300):
        histories = [rng.integers(0, 50, rng.integers(0, 7)) for _ in range(rng.integers(0, 6))]
        histories = [h.astype(np.int32) if rng.random() < 0.5 else h.tolist() for h in histories]
        max_history = int(rng.integers(0, 4))
        got = left_pad(histories, max_history)
        assert got.dtype == torch.long and got.tolist() == reference(histories, max_history)
    assert left_pad([]).shape == (0, 1) and left_pad([[], []]).tolist() == [[-1], [-1]]
