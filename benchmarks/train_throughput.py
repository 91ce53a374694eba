"""Backbone training speed against the machine's limit: forward + backward of the item
tower's backbone (the default MiniLM) on real item texts, for each PEFT method and full
fine-tuning, in fp32 and bf16 autocast, as achieved FLOP/s over the matrix-product peak of
the same dtype measured in the same run.

    python benchmarks/train_throughput.py [--items data/beauty/items.parquet] [--batch 64] [--steps 10]
    python benchmarks/train_throughput.py --backbone SmolLM2-135M --methods frozen,lora   # a decoder beside it

Texts are padded to the batch's own longest text (as training does), at most 32 tokens; the
backbone is loaded as training loads it (`model.backbone_dropout`, 0 by default).
FLOPs are counted analytically per batch: forward 2 x (non-embedding weights) x tokens plus
attention 4 x layers x hidden x sum(len^2); backward = forward again for the activations'
gradients, plus the forward's weight part again for the weights that train (full: all;
PEFT: their own small matrices, counted from their parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from distrec.models.backbone import load_backbone, tokenize_catalog
from distrec.models.config import ModelConfig, PeftConfig
from distrec.models.peft_methods import apply_peft, count_parameters

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)
from gemm import peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAINING = ModelConfig()  # the backbone as training loads it (its dropout setting included)


def linear_weights(model: torch.nn.Module, trainable_only: bool) -> int:
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and (m.weight.requires_grad or not trainable_only))


OP_CLASSES = {  # torch CPU ops by what bounds them
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "dropout masks (random numbers)": ("aten::bernoulli_",),
    "element-wise (mul, add, copy, where, div)": ("aten::mul", "aten::add", "aten::add_", "aten::copy_",
                                                  "aten::where", "aten::div_", "aten::div", "aten::mul_"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "layer norm, softmax": ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::_softmax",
                            "aten::_softmax_backward_data"),
}


def profile_lora(texts, args, peak) -> list[str]:
    """Where the default training step's time goes (LoRA, fp32): self time of torch's CPU
    ops grouped by what bounds them, and the matrix products' own FLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer = load_backbone("all-MiniLM-L6-v2", dropout=TRAINING.backbone_dropout)
    model = apply_peft(model, PeftConfig(method="lora"), 1000)
    model.train()
    ids, lengths = tokenize_catalog(tokenizer, texts, args.tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    all_weights = linear_weights(model, False)
    trained = linear_weights(model, True) + sum(p.numel() for n, p in model.named_parameters()
                                                if p.requires_grad and "lora_" in n)
    flops = 0.0

    def step(count: bool) -> None:
        nonlocal flops
        pick = torch.randint(0, len(texts), (args.batch,), generator=gen)
        width = int(lengths[pick].max())
        mask = (torch.arange(width).unsqueeze(0) < lengths[pick].unsqueeze(1)).long()
        out = model(input_ids=ids[pick, :width].long(), attention_mask=mask).last_hidden_state
        ((out * mask.unsqueeze(-1)).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if count:
            forward = 2 * all_weights * args.batch * width + 4 * layers * hidden * args.batch * width * width
            flops += 2 * forward + 2 * trained * args.batch * width

    for _ in range(2):
        step(False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: sum(e.self_cpu_time_total for e in events if e.key in ops) for name, ops in OP_CLASSES.items()}
    shares["other (optimizer, views, autograd, Python)"] = total - sum(shares.values())
    gemm_seconds = shares["matrix products"] / 1e6
    lines = ["Where the LoRA fp32 step's time goes (`torch.profiler`, self time of CPU ops, same batches; "
             "the profiler itself adds some overhead):", "", "| ops | share of the step |", "|---|---|"]
    lines += [f"| {name} | {value / total:.0%} |" for name, value in shares.items()]
    lines += ["", f"The matrix products alone run at {flops / gemm_seconds / 1e9:,.0f} GFLOP/s, "
              f"{flops / gemm_seconds / peak:.2f} of the fp32 peak; the step as a whole cannot exceed that "
              f"fraction times their share of the time.", ""]
    print("\n".join(lines), flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default=str(REPO / "data" / "beauty" / "items.parquet"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2", help="any model.backbone (a packaged name, a path)")
    parser.add_argument("--methods", default="frozen,lora,adalora,adapter,full")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    texts = pd.read_parquet(args.items)["text"].tolist()
    peaks = {"fp32": peak_flops(torch.float32), "bf16": peak_flops(torch.bfloat16)}
    rows = []
    for method in args.methods.split(","):
        for precision in ("fp32", "bf16"):
            model, tokenizer = load_backbone(args.backbone, dropout=TRAINING.backbone_dropout)
            model = apply_peft(model, PeftConfig(method=method), 1000)
            model.train()
            ids, lengths = tokenize_catalog(tokenizer, texts, args.tokens)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
            gen = torch.Generator().manual_seed(0)
            hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
            all_weights = linear_weights(model, False)
            trained_weights = linear_weights(model, True) + sum(
                p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
            flops, seconds, samples = 0.0, 0.0, 0
            for step in range(args.steps + 2):
                pick = torch.randint(0, len(texts), (args.batch,), generator=gen)
                length = lengths[pick]
                width = int(length.max())
                tokens = ids[pick, :width].long()
                mask = (torch.arange(width).unsqueeze(0) < length.unsqueeze(1)).long()
                cast = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
                started = time.perf_counter()
                with cast:
                    out = model(input_ids=tokens, attention_mask=mask).last_hidden_state
                    loss = (out * mask.unsqueeze(-1)).sum() / mask.sum()
                if optimizer is not None:
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                elapsed = time.perf_counter() - started
                if step < 2:
                    continue  # warm-up
                n_tokens = int(length.sum())  # padding to the batch's longest counts as work done
                padded = args.batch * width
                forward = 2 * all_weights * padded + 4 * layers * hidden * args.batch * width * width
                backward = (forward + 2 * trained_weights * padded) if optimizer is not None else 0
                flops += forward + backward
                seconds += elapsed
                samples += args.batch
                del n_tokens
            trainable = count_parameters(model)[0]
            achieved = flops / seconds
            rows.append((method, precision, trainable, samples / seconds, achieved, achieved / peaks[precision]))
            print(f"{method} {precision}: {samples / seconds:,.0f} texts/s, {achieved / 1e9:,.0f} GFLOP/s, "
                  f"{achieved / peaks[precision]:.2f} of peak", flush=True)
    lines = [f"| {m} | {p} | {t:,} | {r:,.0f} | {a / 1e9:,.0f} | {f:.2f} |" for m, p, t, r, a, f in rows]
    # where LoRA's time goes: for the default backbone (the one the profile's figures in BENCHMARKS.md are of)
    profile_lines = profile_lora(texts, args, peaks["fp32"]) if args.backbone == "all-MiniLM-L6-v2" else []
    text = "\n".join([
        f"## Backbone training speed against the peak ({args.backbone}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "",
        f"`python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`", "",
        f"Batch {args.batch} item texts from {Path(args.items).parent.name}, at most {args.tokens} tokens, padded to the "
        f"batch's longest; backbone dropout {TRAINING.backbone_dropout} as in training "
        f"(`model.backbone_dropout`); forward + backward + AdamW step. Measured peak in this run: fp32 "
        f"{peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s.", "",
        "| method | precision | trainable params | texts/s | GFLOP/s | fraction of the dtype's peak |",
        "|---|---|---|---|---|---|", *lines, "", *profile_lines])
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
