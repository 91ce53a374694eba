"""Every shipped accelerate config goes through what `accelerate launch` does with it (the
launch command's validation and environment) and then through the plugin construction that
`Accelerator()` makes in each process: the checks need no GPU, so a config that would stop a
GPU cluster's first run at once fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.deepspeed]
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def launch_environment(config: Path) -> tuple[object, dict]:
    """(the validated launch args, the environment `accelerate launch` gives each process),
    computed by accelerate's own launch code, as `launch_command` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2",
                                               "-m", "distrec.train"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        if mixed_precision_from_config:
            fields.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_accelerate_config_builds_its_plugin(config, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(REPO)  # the configs name their DeepSpeed JSON relative to the repository
    args, env = launch_environment(config)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    if not args.use_deepspeed:
        assert env.get("ACCELERATE_USE_DEEPSPEED", "false") == "false"
        return
    # what Accelerator() does with a launched DeepSpeed config: the plugin from the environment
    # (before the fix, `mixed_precision: bf16` beside `deepspeed_config_file` raised here:
    # "When using `deepspeed_config_file`, the following accelerate config variables will be ignored")
    plugin = DeepSpeedPlugin()
    assert (REPO / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).is_file()
    # then distrec's train.mixed_precision (auto: bf16 on GPUs) reaches the DeepSpeed JSON
    gpu = config.stem.startswith(("gpu", "multinode"))
    plugin.set_mixed_precision("bf16" if gpu else "no")
    bf16 = plugin.deepspeed_config.get("bf16", {}).get("enabled")
    assert bf16 is (True if gpu else False), (config.name, plugin.deepspeed_config.get("bf16"))
