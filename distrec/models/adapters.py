"""Houlsby bottleneck adapters (Houlsby et al. 2019), saved and loaded like PEFT adapters.

Written here because PEFT 0.21 has no bottleneck adapter and the `adapters` package 1.3
pins transformers 4.57 (it fails to import with transformers 5). An adapter sits on the
output of each attention output projection and each feed-forward output projection, before
the residual sum: y + up(gelu(down(y))), with `up` zero-initialised so a fresh adapter is
the identity and training starts from the pretrained model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distrec.config import ConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# attention-output and feed-forward-output projections, by architecture family
DEFAULT_TARGETS = [
    r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$",  # BERT, RoBERTa, MiniLM
    r"self_attn\.o_proj$", r"mlp\.down_proj$",  # LLaMA, Mistral, Qwen, SmolLM
    r"attn\.c_proj$", r"mlp\.c_proj$",  # GPT-2
]


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(nn.functional.gelu(self.down(y)))


class Adapted(nn.Module):
    """A module followed by its adapter."""

    def __init__(self, base: nn.Module, hidden: int, size: int):
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(hidden, size)

    def forward(self, *args, **kwargs):
        return self.adapter(self.base(*args, **kwargs))


def add_adapters(model: nn.Module, size: int, targets: list[str] | None = None) -> list[str]:
    """Wrap every module whose name matches a target pattern; freeze all but the adapters.
    Returns the wrapped module names (a clear error when nothing matches)."""
    patterns = [re.compile(p) for p in (targets or DEFAULT_TARGETS)]
    hidden = model.config.hidden_size
    names = [n for n, _ in model.named_modules() if n and any(p.search(n) for p in patterns)]
    if not names:
        raise ConfigError(f"peft.target_modules: no module of {type(model).__name__} matches "
                          f"{targets or DEFAULT_TARGETS}; name the output projections of its blocks")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Adapted(getattr(parent, child), hidden, size))
    for name, param in model.named_parameters():
        param.requires_grad = ".adapter." in name
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if ".adapter." in n}


def save_adapters(model: nn.Module, directory: str | Path, size: int, names: list[str],
                  state: dict[str, torch.Tensor] | None = None) -> None:
    """Like PeftModel.save_pretrained: a JSON config and a safetensors file of the adapters."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    (directory / CONFIG_NAME).write_text(json.dumps(
        {"peft_type": "HOULSBY_ADAPTER", "adapter_size": size, "modules": names}, indent=2))
    save_file(state, str(directory / WEIGHTS_NAME))


def load_adapters(model: nn.Module, directory: str | Path) -> tuple[list[str], int]:
    """Add the adapters described in `directory` to a plain backbone and load their weights;
    return (wrapped module names, adapter size)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    names = add_adapters(model, config["adapter_size"], [re.escape(n) + "$" for n in config["modules"]])
    state = load_file(str(directory / WEIGHTS_NAME))
    missing = set(adapter_state_dict(model)) - set(state)
    if missing or set(state) - set(adapter_state_dict(model)):
        raise ConfigError(f"{directory}: adapter weights do not match the backbone "
                          f"(missing {sorted(missing)[:3]}...)")
    model.load_state_dict(state, strict=False)
    return names, config["adapter_size"]
