from pathlib import Path

import pytest
import yaml

from distrec.config import ConfigError, load_config, parse_override, save_config, to_dict
from distrec.data.config import PrepareConfig
from distrec.score.config import ScoreConfig
from distrec.train.config import TrainConfig

CONFIGS = Path(__file__).parent.parent / "configs"
# which schema validates the YAML files of each configs/ folder
SCHEMAS = {"prepare": PrepareConfig, "train": TrainConfig, "score": ScoreConfig}


def test_defaults_and_override_types():
    cfg = load_config(PrepareConfig, overrides=["split.mode=time", "filter.min_rating=4", "shards.max_history=50",
                                                "filter.events=[buy, cart]", "columns.user=1", "overwrite=true"])
    assert cfg.split.mode == "time"
    assert cfg.filter.min_rating == 4.0 and isinstance(cfg.filter.min_rating, float)
    assert cfg.shards.max_history == 50
    assert cfg.filter.events == ["buy", "cart"]
    assert cfg.columns.user == "1"
    assert cfg.overwrite is True
    assert cfg.source == "synthetic"


@pytest.mark.parametrize("override, message", [
    ("split.mdoe=time", "unknown key 'split.mdoe'; did you mean 'mode'?"),
    ("shard.max_history=3", "unknown key 'shard'; did you mean 'shards'?"),
    ("split.mode=tiem", "split.mode: expected one of 'loo' | 'time', got 'tiem'; did you mean 'time'?"),
    ("shards.max_history=many", "shards.max_history: expected int, got 'many'"),
    ("shards.max_history=-1", "shards.max_history and shards.seed must be >= 0"),
    ("split.val_fraction=0.95", "split.val_fraction + split.test_fraction must be < 1"),
    ("overwrite=maybe", "overwrite: expected bool, got 'maybe'"),
    ("novalue", "must look like key=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, overrides=[override])
    assert message in str(e.value)


def test_yaml_unknown_key_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("source: recbole\nfilter:\n  min_ratign: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'filter.min_ratign'; did you mean 'min_rating'\?"):
        load_config(PrepareConfig, path)


def test_yaml_then_overrides_then_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source: p5\nsplit:\n  mode: loo\n  seed: 3\n")
    cfg = load_config(PrepareConfig, path, ["split.seed=4"], base={"out": "x"})
    assert (cfg.source, cfg.split.seed, cfg.out) == ("p5", 4, "x")
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(PrepareConfig, tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_override_values_are_yaml():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")


def _shipped_yaml():
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] in SCHEMAS)


def test_every_config_folder_has_a_schema():
    folders = {p.relative_to(CONFIGS).parts[0] for p in CONFIGS.rglob("*.yaml")} - {"accelerate"}
    assert folders <= set(SCHEMAS), f"configs/ folders without a schema in this test: {folders - set(SCHEMAS)}"
    assert len(_shipped_yaml()) >= 5


@pytest.mark.parametrize("path", _shipped_yaml(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    cfg = load_config(SCHEMAS[path.relative_to(CONFIGS).parts[0]], path)
    # every key written in the file survives into the resolved config
    def check(written, resolved, where):
        for key, value in written.items():
            if isinstance(value, dict):
                check(value, resolved[key], f"{where}{key}.")
            else:
                assert resolved[key] == value, f"{path}: {where}{key}"
    check(yaml.safe_load(path.read_text()), to_dict(cfg), "")


def test_a_bare_no_in_yaml_is_the_no_choice_not_false():
    from distrec.config import load_config
    from distrec.train.config import TrainConfig

    assert load_config(TrainConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(TrainConfig, None, ["train.mixed_precision=yes"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("accelerate/*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads_in_accelerate_and_names_a_real_deepspeed_json(path):
    """Checked by accelerate's own loader (the one `accelerate launch --config_file` uses)."""
    import json

    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes >= 2
    if str(cfg.distributed_type).endswith("DEEPSPEED"):
        ds = CONFIGS.parent / cfg.deepspeed_config["deepspeed_config_file"]
        conf = json.loads(ds.read_text())
        assert conf["zero_optimization"]["stage"] in (2, 3)
        assert "optimizer" not in conf and "scheduler" not in conf  # distrec brings its own
        if path.name.startswith("cpu_"):
            assert conf["bf16"]["enabled"] is False  # DeepSpeed on CPU runs fp32


def test_write_atomic_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    """A failure half-way through (here: the disk fills) keeps the previous file byte for byte
    and leaves no temp file; a good write replaces it whole."""
    import errno
    from pathlib import Path

    from distrec.atomic import write_atomic

    target = tmp_path / "results.json"
    write_atomic(target, '{"old": true}')
    original = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, '{"new": "a longer value that does not fit"}')
    monkeypatch.undo()
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_atomic(target, "{}")
    assert target.read_text() == "{}"


@pytest.mark.parametrize("override, message", [
    ("split.mode=tiem", "split.mode: expected one of 'loo' | 'time', got 'tiem'"),
    ("split.mdoe=time", "unknown key 'split.mdoe'"),
    ("split.val_fraction=0.95", "split.val_fraction + split.test_fraction must be < 1"),
])
def test_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path, override, message):
    path = tmp_path / "good.yaml"
    path.write_text("source: recbole\nsplit:\n  seed: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, path, ["shards.seed=1", override])
    assert str(e.value).startswith(f"command line: {override}: ") and message in str(e.value), str(e.value)
    assert "good.yaml" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("split:\n  mode: tiem\n", "split.mode: expected one of 'loo' | 'time', got 'tiem'"),
    ("split:\n  val_fraction: 0.95\n", "split.val_fraction + split.test_fraction must be < 1"),
])
def test_bad_yaml_value_is_blamed_on_the_file_not_the_command_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, path, ["shards.seed=1"])
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert "command line" not in str(e.value)


def test_override_fixing_the_file_is_fine_and_check_messages_name_their_key_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  mode: tiem\n")
    assert load_config(PrepareConfig, path, ["split.mode=time"]).split.mode == "time"
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, overrides=["synthetic.num_categories=3", "synthetic.num_items=2"])
    assert str(e.value) == ("command line: synthetic.num_items=2: "
                            "synthetic: num_categories must be <= num_items"), str(e.value)


def test_block_scalar_signs_are_plain_characters_on_a_command_line():
    assert load_config(PrepareConfig, overrides=["columns.separator=|"]).columns.separator == "|"
    assert load_config(PrepareConfig, overrides=["columns.separator=\\t"]).columns.separator == "\t"


def test_bad_flag_is_blamed_on_the_command_line_not_the_file(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("split:\n  seed: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, path, ["shards.seed=1"], base={"source": "recbol"})
    assert str(e.value).startswith("command line: source: expected one of"), str(e.value)
