"""What distrec loads cannot run code: checkpoints are safetensors, a pickle in their place
is refused without being unpickled, and remote code stays off unless the config asks."""

import os
import pickle

import pandas as pd
import pytest
import torch

from distrec.config import ConfigError
from distrec.models.config import ModelConfig, PeftConfig
from distrec.models.run import build_model, load_model, save_model


class _Payload:
    """Unpickling this would create a file: the marker that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_posing_as_a_checkpoint_is_refused_and_never_unpickled(tmp_path):
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(12)], "text": ["x"] * 12, "train_count": [1] * 12})
    model, _ = build_model(ModelConfig(item_repr="id", dim=8, heads=2, layers=1, max_len=4), PeftConfig(), items, 10)
    save_model(model, tmp_path / "ckpt", PeftConfig(), list(items["item_id"]))
    marker = tmp_path / "code-ran"
    heads = next((tmp_path / "ckpt").glob("*.safetensors"))
    heads.write_bytes(pickle.dumps({"weight": _Payload(str(marker))}))
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        load_model(tmp_path / "ckpt", items)
    assert not marker.exists()


def _tiny_run(tmp_path, *extra):
    from distrec.cli import main

    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--no-progress", "synthetic.num_users=80",
                 "synthetic.num_items=30", "synthetic.mean_length=6"]) == 0
    assert main(["train", "--no-progress", f"data.dir={data}", f"run.dir={run}", "model.item_repr=id", "model.dim=8",
                 "model.heads=2", "train.max_steps=2", "train.batch_size=16", *extra]) == 0
    return data, run


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_pickle_in_the_resume_state_is_refused_and_never_unpickled(tmp_path, name, capfd):
    """The resume state (accelerate's optimizer, scheduler and RNG files, read by torch.load)
    with a pickle that would run code: `distrec train --resume` refuses it in one line."""
    from distrec.cli import main

    data, run = _tiny_run(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(str(marker))}, run / "last" / name)
    capfd.readouterr()
    assert main(["train", "--no-progress", "--resume", f"data.dir={data}", f"run.dir={run}", "model.item_repr=id",
                 "model.dim=8", "model.heads=2", "train.max_steps=4", "train.batch_size=16"]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot read the resume state" in errors[0] and str(run / "last") in errors[0]
    assert not marker.exists()


def test_remote_code_reaches_from_pretrained_only_when_asked(tmp_path, monkeypatch):
    """What the backbone loader passes to transformers, not the config default: off unless
    model.trust_remote_code=true (the real from_pretrained runs; the spy only records)."""
    import transformers

    from distrec.models.backbone import load_backbone

    seen = []
    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = ModelConfig()
    load_backbone(cfg.backbone, cfg.trust_remote_code)
    assert seen == [False, False]
    load_backbone(cfg.backbone, True)
    assert seen[2:] == [True, True]


def test_no_tracker_key_is_written_into_a_run(tmp_path, monkeypatch):
    """Tracker credentials come from the environment only; a run directory never holds them."""
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    _, run = _tiny_run(tmp_path)
    for path in run.rglob("*"):
        if path.is_file():
            assert b"secret-key-123" not in path.read_bytes(), path
    assert os.environ["WANDB_API_KEY"] == "secret-key-123"


def test_reading_a_hostile_shard_writes_no_file_anywhere(tmp_path, monkeypatch):
    """A shard whose members try to escape (`../` names, an absolute path, a symlink to
    /etc/passwd, a hard link) is read in memory and never extracted: no file appears outside
    (or inside) the dataset, and the reader stops with a DataError naming the shard."""
    import hashlib
    import io
    import json
    import tarfile

    from distrec.formats import DataError
    from distrec.data.shards import ShardedSamples

    data = tmp_path / "data"
    data.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("../escape.json", "/tmp/distrec_abs_escape.json", "000.json"):
            payload = json.dumps({"user": 0, "history": [1], "target": 2}).encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for kind, name in ((tarfile.SYMTYPE, "001.json"), (tarfile.LNKTYPE, "002.json")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
    (data / "train-00000.tar").write_bytes(buffer.getvalue())
    (data / "manifest.json").write_text(json.dumps({"shards": [{
        "path": "train-00000.tar", "samples": 5, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}]}))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(DataError, match=r"train-00000.tar"):
        for _ in ShardedSamples(data, batch_size=5, shuffle=False):
            pass
    assert {p for p in tmp_path.rglob("*")} == before
    assert not os.path.exists("/tmp/distrec_abs_escape.json")
