"""Turning a backbone into a trainable one: the registry of PEFT methods (METHODS), each
one entry: how it wraps the backbone, saves what it trained, reloads it onto a fresh
backbone to give the same outputs, and the optional hooks of its training step (called by
the trainer and the model, which never branch on a method's name).

lora and adalora come from PEFT; the bottleneck adapter from `adapters.py`. A new method is
one `register(PeftMethod(...))` here plus its case in tests/models/test_peft_models.py.
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distrec.config import ConfigError
from distrec.models import adapters
from distrec.registry import Registry

if TYPE_CHECKING:
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


def _freeze(model: nn.Module, cfg: PeftConfig, total_steps: int) -> nn.Module:
    for param in model.parameters():
        param.requires_grad = False
    return model


def _unfreeze(model: nn.Module, cfg: PeftConfig, total_steps: int) -> nn.Module:
    for param in model.parameters():
        param.requires_grad = True
    return model


def _add_adapters(model: nn.Module, cfg: PeftConfig, total_steps: int) -> nn.Module:
    model.adapter_modules = adapters.add_adapters(model, cfg.adapter_size, cfg.target_modules)
    model.adapter_size = cfg.adapter_size
    return model


def _peft_wrap(make_config):
    """apply: the backbone wrapped by PEFT with the LoraConfig-like `make_config(cfg, targets, total_steps)`."""
    def apply(model: nn.Module, cfg: PeftConfig, total_steps: int) -> nn.Module:
        from peft import get_peft_model  # imported when used: 3 s a process

        targets = cfg.target_modules or default_targets(model)
        try:
            return get_peft_model(model, make_config(cfg, targets, total_steps))
        except ValueError as e:
            raise ConfigError(f"peft.target_modules={targets}: {e}") from None
    return apply


def _lora_config(cfg: PeftConfig, targets: list[str], total_steps: int):
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)


def _adalora_config(cfg: PeftConfig, targets: list[str], total_steps: int):
    from peft import AdaLoraConfig

    # rank budget: warm up 10% of training, prune ranks until 70%, then hold (AdaLoRA paper's shape)
    total = max(total_steps, 10)
    return AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.r, lora_alpha=cfg.alpha,
                         orth_reg_weight=cfg.adalora_orth_reg, lora_dropout=cfg.dropout, target_modules=targets,
                         total_step=total, tinit=total // 10, tfinal=total * 3 // 10, deltaT=max(1, total // 100))


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


def _save_peft(model: nn.Module, directory: Path, state: dict | None) -> None:
    model.save_pretrained(str(directory / "adapter"), state_dict=state)


def _save_adapters(model: nn.Module, directory: Path, state: dict | None) -> None:
    adapters.save_adapters(model, directory / "adapter", model.adapter_size, model.adapter_modules,
                           state={k: v for k, v in state.items() if ".adapter." in k} if state else None)


def _save_full(model: nn.Module, directory: Path, state: dict | None) -> None:
    weights = state if state is not None else model.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(directory / FULL_WEIGHTS))


def _load_peft(model: nn.Module, directory: Path) -> nn.Module:
    if not (directory / "adapter").exists():
        raise ConfigError(f"{directory}: no adapter/ directory for a PEFT (lora, adalora) checkpoint")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory / "adapter"))


def _load_adapters(model: nn.Module, directory: Path) -> nn.Module:
    model.adapter_modules, model.adapter_size = adapters.load_adapters(model, directory / "adapter")
    return model


def _load_full(model: nn.Module, directory: Path) -> nn.Module:
    try:
        state = load_file(str(directory / FULL_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ConfigError(f"{directory / FULL_WEIGHTS}: cannot read the weights ({e})") from None
    model.load_state_dict(state)
    return model


def _adalora_unreached(model: nn.Module) -> list[nn.Parameter]:
    """AdaLoRA's A, E, B and rank counters: they sit in ParameterDicts that are never called,
    so ZeRO-3's per-module gathering never sees them (DeepSpeed keeps them whole instead)."""
    return [p for m in model.modules() if isinstance(getattr(m, "lora_E", None), nn.ParameterDict)
            for attr in ("lora_A", "lora_B", "lora_E", "ranknum") for p in getattr(m, attr).values()]


@dataclass(frozen=True)
class PeftMethod:
    """One way of tuning the backbone. Hooks left None do nothing.

    apply(backbone, PeftConfig, total_steps) -> backbone: wrapped or frozen for training.
    save(backbone, directory, state | None): what it trained (state: a gathered state dict, ZeRO-3).
    load(backbone, directory) -> backbone: that put back onto a freshly loaded backbone.
    after_backward(backbone, step, full_grad | None): gradients exist, the optimizer has not
        stepped (full_grad(p): where DeepSpeed keeps a gradient; None: p.grad).
    after_step(backbone, step, write_master | None): after the optimizer step (write_master(p,
        value): also into DeepSpeed's fp32 master copy).
    regulariser(backbone) -> tensor | None: added to the loss.
    unreached(backbone) -> [parameters]: weights no module call reads (ZeRO-3 must keep them whole
        and cannot trust its recorded fetch order)."""
    name: str
    doc: str
    apply: Callable
    save: Callable = lambda model, directory, state: None
    load: Callable = lambda model, directory: model
    after_backward: Callable | None = None
    after_step: Callable | None = None
    regulariser: Callable | None = None
    unreached: Callable | None = None


METHODS = Registry("PEFT method")
register = METHODS.register


register(PeftMethod("lora", "LoRA (PEFT): rank-r updates of the blocks' linear layers (peft.r, peft.alpha)",
                    _peft_wrap(_lora_config), _save_peft, _load_peft))
register(PeftMethod("adalora", "AdaLoRA (PEFT): LoRA whose ranks are pruned to a budget during training "
                    "(peft.adalora_init_r -> peft.r)", _peft_wrap(_adalora_config), _save_peft, _load_peft,
                    after_backward=lambda m, step, full_grad=None: adalora_update_importance(m, step, full_grad),
                    after_step=lambda m, step, write_master=None: adalora_apply_masks(m, step, write_master),
                    regulariser=lambda m: adalora_orth_loss(m), unreached=_adalora_unreached))
register(PeftMethod("adapter", "Houlsby bottleneck adapters after the blocks' target layers (peft.adapter_size)",
                    _add_adapters, _save_adapters, _load_adapters))
register(PeftMethod("full", "every backbone weight trained", _unfreeze, _save_full, _load_full))
register(PeftMethod("frozen", "nothing in the backbone trained (its pooled outputs are cached once)", _freeze))


def method_doc() -> str:
    return "how the backbone is tuned - " + METHODS.describe()


def apply_peft(model: nn.Module, cfg: PeftConfig, total_steps: int) -> nn.Module:
    """Wrap or freeze `model` for `cfg.method`; `total_steps` sets AdaLoRA's rank schedule."""
    return METHODS[cfg.method].apply(model, cfg, total_steps)


def save_backbone(model: nn.Module, method: str, directory: Path, state: dict | None = None) -> None:
    """Save what `method` trained (nothing for a frozen backbone)."""
    directory.mkdir(parents=True, exist_ok=True)
    METHODS[method].save(model, directory, state)


def load_backbone_weights(model: nn.Module, method: str, directory: Path) -> nn.Module:
    """Put the saved trained part back onto a freshly loaded backbone."""
    return METHODS[method].load(model, directory)
