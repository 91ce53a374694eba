"""GPU checks, one script, under 10 minutes on one GPU (none in CI; run it where one is lent):

  1. the card's measured bf16 matrix-product peak (the limit);
  2. bf16 training steps of a ~0.5B-parameter decoder built from a config (random weights)
     with LoRA under DeepSpeed ZeRO-2 on one GPU: tokens/s and MFU against that peak;
  3. full-catalog top-100 of 1M users x 1M items (64 dims) with distrec's blocked kernel
     (`precision=auto`: bf16 candidates rescored in fp32, exact): users/s, achieved FLOP/s
     against the bf16 peak, the users scored again in fp32, and the lists of 8,192 users
     against the all-fp32 path;
  4. the `distrec score` Ray job with its actor on the GPU (`device=cuda`) against the same
     job on the CPU: a small synthetic dataset and a 1-epoch ID model, the lists compared.

    python benchmarks/gpu_check.py [--steps 20] [--no-append]

Model FLOPs per token for LoRA training: forward 2P, backward 2P for the activations'
gradients (the frozen weights need no weight gradients), plus attention 12 L s h
(forward and backward); P = the backbone's parameters, L layers, s sequence, h hidden.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)
from gemm import peak_flops  # noqa: E402


def train_check(steps: int, batch: int, seq: int, peak: float) -> dict:
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    config = Qwen2Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000, max_position_embeddings=seq)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj", "gate_proj", "up_proj",
                                                                                  "down_proj"]))
    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                 "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=engine.device)
    for _ in range(3):  # warm-up
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        engine.step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    per_token = 4 * params + 12 * config.num_hidden_layers * seq * config.hidden_size
    achieved = per_token * batch * seq * steps / seconds
    return {"params": params, "tokens_per_s": batch * seq * steps / seconds, "flops": achieved, "mfu": achieved / peak}


def scoring_check(users: int, items: int, dim: int, peak: float) -> dict:
    from distrec.score import kernel
    from distrec.score.kernel import top_candidates

    gen = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(items, dim, device="cuda", generator=gen)
    block_users = 8192
    sample = torch.randn(block_users, dim, device="cuda", generator=gen)
    fast = top_candidates(sample, table, 100, block=262144)  # warm-up, and the lists checked below
    exact = top_candidates(sample, table, 100, block=262144, precision="fp32")
    same = float((fast[1] == exact[1]).float().mean())
    before = dict(kernel.STATS)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(users // block_users):
        top_candidates(torch.randn(block_users, dim, device="cuda", generator=gen), table, 100, block=262144)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    done = (users // block_users) * block_users
    flops = 2 * done * items * dim / seconds
    return {"users_per_s": done / seconds, "seconds": seconds, "flops": flops, "fraction": flops / peak,
            "same_as_fp32": same, "bf16_users": kernel.STATS["bf16_users"] - before["bf16_users"],
            "fp32_again": kernel.STATS["fp32_again"] - before["fp32_again"]}


def job_check() -> dict:
    import tempfile
    from pathlib import Path

    from distrec.cli import main as distrec
    from distrec.score.job import read_recommendations

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assert distrec(["prepare", "--source", "synthetic", "--out", str(root / "data"), "--no-progress",
                        "synthetic.num_users=3000", "synthetic.num_items=800"]) == 0
        assert distrec(["train", "--no-progress", f"data.dir={root / 'data'}", f"run.dir={root / 'run'}", "trackers=[]",
                        "model.item_repr=id", "model.dim=32", "model.max_len=20", "train.epochs=1"]) == 0
        lists, seconds = {}, {}
        for device in ("cuda", "cpu"):
            started = time.perf_counter()
            assert distrec(["score", "--run", str(root / "run"), "--data", str(root / "data"), "--out",
                            str(root / f"recs-{device}"), f"device={device}", "k=10", "candidates=50",
                            "precision=fp32"]) == 0
            seconds[device] = time.perf_counter() - started
            recs = read_recommendations(root / f"recs-{device}").sort_values(["user_id", "rank"])
            lists[device] = recs["item_id"].tolist()
        same = sum(a == b for a, b in zip(lists["cuda"], lists["cpu"])) / max(len(lists["cpu"]), 1)
    return {"rows": len(lists["cpu"]), "same": same, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    peak16 = peak_flops(torch.bfloat16, 8192, "cuda", 3.0)
    peak32 = peak_flops(torch.float32, 8192, "cuda", 3.0)
    print(f"{card}: bf16 peak {peak16 / 1e12:.0f} TFLOP/s, fp32 {peak32 / 1e12:.0f}", flush=True)
    train = train_check(args.steps, 8, 1024, peak16)
    print(f"train: {train}", flush=True)
    score = scoring_check(1_000_000, 1_000_000, 64, peak16)
    print(f"score: {score}", flush=True)
    job = job_check()
    print(f"job: {job}", flush=True)
    text = "\n".join([
        f"## GPU checks ({card})", "", f"`python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`", "",
        f"- measured matrix-product peak: bf16 {peak16 / 1e12:,.0f} TFLOP/s, fp32 {peak32 / 1e12:,.0f} TFLOP/s",
        f"- LoRA training, {train['params'] / 1e6:,.0f}M-parameter decoder (Qwen2 shape, random weights), bf16, "
        f"DeepSpeed ZeRO-2, batch 8 x 1024 tokens: {train['tokens_per_s']:,.0f} tokens/s, "
        f"{train['flops'] / 1e12:,.1f} TFLOP/s, MFU {train['mfu']:.2f} of the bf16 peak",
        f"- full-catalog top-100, 1M users x 1M items x 64 dims, bf16 candidates rescored in fp32: "
        f"{score['users_per_s']:,.0f} users/s ({score['seconds']:.0f} s), {score['fraction']:.2f} of the bf16 peak; "
        f"{score['fp32_again']:,} of {score['bf16_users']:,} users scored again in fp32; lists of 8,192 users "
        f"equal to the all-fp32 path's at {score['same_as_fp32']:.4f} of positions",
        f"- `distrec score` with its actor on the GPU against the same job on the CPU (3,000 synthetic users, "
        f"1-epoch ID model, fp32): {job['rows']:,} list rows, {job['same']:.4f} of positions equal; "
        f"{job['seconds']['cuda']:.0f} s against {job['seconds']['cpu']:.0f} s (small; the GPU run also starts Ray)", ""])
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
