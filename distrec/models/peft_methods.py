"""Turning a backbone into a trainable one: lora | adalora | adapter | full | frozen.

LoRA and AdaLoRA come from PEFT; the bottleneck adapter from `adapters.py`. Each method
saves only what it trained (`save_backbone`) and reloads onto a fresh backbone
(`load_backbone_weights`) to give the same outputs.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distrec.config import ConfigError
from distrec.models import adapters
from distrec.models.config import PeftConfig

FULL_WEIGHTS = "backbone.safetensors"


def default_targets(model: nn.Module) -> list[str]:
    """Short names of the linear layers inside the transformer blocks (not embeddings or heads)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and re.search(r"\.\d+\.", f".{n}")}
    if not names:
        raise ConfigError(f"{type(model).__name__}: no linear layers found inside numbered blocks; "
                          "set peft.target_modules")
    return sorted(names)


def apply_peft(model: nn.Module, cfg: PeftConfig, total_steps: int) -> nn.Module:
    """Wrap or freeze `model` for `cfg.method`; `total_steps` sets AdaLoRA's rank schedule."""
    if cfg.method in ("full", "frozen"):
        for param in model.parameters():
            param.requires_grad = cfg.method == "full"
        return model
    if cfg.method == "adapter":
        model.adapter_modules = adapters.add_adapters(model, cfg.adapter_size, cfg.target_modules)
        model.adapter_size = cfg.adapter_size
        return model
    from peft import AdaLoraConfig, LoraConfig, get_peft_model  # imported when used: 3 s a process

    targets = cfg.target_modules or default_targets(model)
    if cfg.method == "lora":
        peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    else:
        # rank budget: warm up 10% of training, prune ranks until 70%, then hold (AdaLoRA paper's shape)
        total = max(total_steps, 10)
        peft_cfg = AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.r, lora_alpha=cfg.alpha,
                                 orth_reg_weight=cfg.adalora_orth_reg,
                                 lora_dropout=cfg.dropout, target_modules=targets, total_step=total,
                                 tinit=total // 10, tfinal=total * 3 // 10, deltaT=max(1, total // 100))
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"peft.target_modules={targets}: {e}") from None


def is_peft(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # not imported: no model of it exists
    return peft is not None and isinstance(model, peft.PeftModel)


def _adalora(model: nn.Module):
    """(AdaLoRA config, its rank allocator, the model it allocates over) of a PEFT AdaLoRA
    model, else None. The allocator works on the tuner's inner model (parameter names without
    PEFT's `base_model.model.` prefix), as PEFT's own update_and_allocate does."""
    if is_peft(model) and model.peft_config["default"].peft_type.value == "ADALORA":
        return model.peft_config["default"], model.base_model.rankallocator, model.base_model.model
    return None


def _gathered(params: list, modifier_rank: int | None = None):
    """All of `params` whole while inside (DeepSpeed ZeRO-3 partitions them); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def adalora_update_importance(model: nn.Module, step: int, full_grad=None) -> None:
    """AdaLoRA, part 1, after backward and BEFORE the optimizer step: update the importance
    scores from the gradients. `full_grad(p)` fetches a gradient where the optimizer keeps it
    (DeepSpeed: `deepspeed.utils.safe_get_full_grad`; `p.grad` is None there), else p.grad.

    Stock PEFT does both parts in one call after the step, which under DeepSpeed finds no
    gradients (ZeRO-2 crashes) and masks weights the fp32 master copy then overwrites."""
    found = _adalora(model)
    if found is None:
        return
    cfg, allocator, inner = found
    if step >= cfg.total_step - cfg.tfinal:
        return
    if full_grad is None:
        allocator.update_ipt(inner)
        return
    params = [p for n, p in inner.named_parameters() if "lora_" in n and allocator.adapter_name in n]
    with _gathered(params):
        for p in params:
            p.grad = full_grad(p)
        try:
            allocator.update_ipt(inner)
        finally:
            for p in params:
                p.grad = None


def adalora_apply_masks(model: nn.Module, step: int, write_master=None) -> None:
    """AdaLoRA, part 2, AFTER the optimizer step: prune the singular values to the rank budget
    of this step (or re-apply the final pattern). `write_master(p, value)` also writes the
    masked values into the optimizer's fp32 master copy (DeepSpeed:
    `deepspeed.utils.safe_set_full_fp32_param`), so the next step does not undo the mask.
    Every rank computes the same masks (same averaged gradients, same weights)."""
    found = _adalora(model)
    if found is None:
        return
    cfg, allocator, inner = found
    final = cfg.total_step - cfg.tfinal
    singular = [p for n, p in inner.named_parameters() if f"lora_E.{allocator.adapter_name}" in n]
    with _gathered(singular, modifier_rank=0), torch.no_grad():
        if step < final:
            budget, mask_now = allocator.budget_schedule(step)
            if not mask_now:
                return
            pattern = allocator.mask_to_budget(inner, budget)
            if pattern:
                cfg.rank_pattern = pattern
        elif step == final:
            budget, _ = allocator.budget_schedule(step)
            cfg.rank_pattern = allocator.mask_to_budget(inner, budget)
            allocator.reset_ipt()
        elif cfg.rank_pattern:
            allocator.mask_using_rank_pattern(inner, cfg.rank_pattern)
        else:
            return
        if write_master is not None:
            for p in singular:
                write_master(p, p.data.clone())


def adalora_orth_loss(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonality regulariser (PEFT adds it only when the model computes the loss)."""
    if not (is_peft(model) and model.peft_config["default"].peft_type.value == "ADALORA"):
        return None
    if not model.peft_config["default"].orth_reg_weight:
        return None
    terms = []
    for name, param in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and param.requires_grad:
            para = param if "lora_A" in name else param.T
            eye = torch.eye(para.shape[0], device=para.device, dtype=para.dtype)
            terms.append(torch.norm(para @ para.T - eye, p="fro"))
    if not terms:
        return None
    return model.peft_config["default"].orth_reg_weight * torch.stack(terms).mean()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_backbone(model: nn.Module, method: str, directory: Path, state: dict | None = None) -> None:
    """Save what `method` trained: PEFT adapters via save_pretrained, our adapters, the full
    weights (safetensors), or nothing for a frozen backbone. `state`: an already gathered
    state dict (ZeRO-3 gathers before saving)."""
    directory.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(str(directory / "adapter"), state_dict=state)
    elif method == "adapter":
        adapters.save_adapters(model, directory / "adapter", model.adapter_size, model.adapter_modules,
                               state={k: v for k, v in state.items() if ".adapter." in k} if state else None)
    elif method == "full":
        weights = state if state is not None else model.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(directory / FULL_WEIGHTS))


def load_backbone_weights(model: nn.Module, method: str, directory: Path) -> nn.Module:
    """Put the saved trained part back onto a freshly loaded backbone."""
    if method in ("lora", "adalora"):
        if not (directory / "adapter").exists():
            raise ConfigError(f"{directory}: no adapter/ directory for peft.method={method}")
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(directory / "adapter"))
    if method == "adapter":
        model.adapter_modules, model.adapter_size = adapters.load_adapters(model, directory / "adapter")
        return model
    if method == "full":
        try:
            state = load_file(str(directory / FULL_WEIGHTS))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ConfigError(f"{directory / FULL_WEIGHTS}: cannot read the weights ({e})") from None
        model.load_state_dict(state)
    return model
