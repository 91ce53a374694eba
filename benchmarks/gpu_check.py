"""GPU checks, one prepared command, under 6 minutes on one GPU (CI has none; run it where one is
lent). Each part runs under its own try/except ("skipped: why" in the results) and the results
are written as JSON under --out after every part, so a part that fails or a time limit that
cuts the run short still leaves what was measured.

  peak    the card's measured bf16 / fp32 matrix-product rate, and its nominal dense bf16 peak
  train   bf16 LoRA training of a ~0.5B-parameter decoder (Qwen2 shape, random weights) under
          DeepSpeed ZeRO-2 on one GPU: tokens/s; MFU with the LoRA FLOP count (4N per token)
          and the usual 6N, N without the input embedding, against both peaks
  score   distrec's exact top-100 (`precision=auto`: bf16 candidates rescored in fp32) of
          262,144 users x 1M items x 64 dims; lists of 8,192 users against the all-fp32 path
  actor   the scoring job's actor (`BlockScorer`) with the user tower and top-N on the GPU
          against the same actor on the CPU, without Ray (its wheel cannot travel): a small
          synthetic dataset and a 1-epoch ID model, every list compared

On the GPU machine (Python 3.12 with torch, transformers, peft, accelerate; no deepspeed or
webdataset, no package index): build the wheels here once, `bash benchmarks/gpu_wheels.sh`
(benchmarks/gpu_wheels/, git-ignored, ~5 MB), carry them, and run
    python3 benchmarks/gpu_check.py --wheels benchmarks/gpu_wheels --out $OUT
On a CPU, the same parts at toy sizes (CI runs it):
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # distrec from the checkout, then the benchmark helpers

import torch  # noqa: E402

NOMINAL_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def install_wheels(wheels: Path) -> str:
    """Install the carried wheels into a private folder put first on sys.path (nothing of the
    machine's Python is changed); returns what was done."""
    missing = [name for name in ("deepspeed", "webdataset") if _absent(name)]
    if not missing:
        return "nothing to install"
    target = Path(tempfile.gettempdir()) / "distrec-gpu-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                    "--target", str(target), "--no-deps", *sorted(str(p) for p in wheels.glob("*.whl"))], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    return f"installed {len(list(wheels.glob('*.whl')))} wheels for {', '.join(missing)} into {target}"


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def peak_check(device: str, seconds: float, size: int) -> dict:
    from gemm import peak_flops

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None)
    return {"card": name, "bf16_measured": peak_flops(torch.bfloat16, size, device, seconds),
            "fp32_measured": peak_flops(torch.float32, size, device, seconds), "bf16_nominal": nominal}


def train_check(device: str, steps: int, batch: int, seq: int, shape: dict, peak: dict) -> dict:
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    config = Qwen2Config(**shape, vocab_size=32000, max_position_embeddings=seq)
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()  # a lookup, not a product: no FLOPs
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                 "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                 "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=engine.device)

    def step():
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        return loss.detach().item()

    for _ in range(2):  # warm-up
        step()
    _sync(device)
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    _sync(device)
    seconds = time.perf_counter() - started
    n = params - embedding
    attention = 12 * config.num_hidden_layers * seq * config.hidden_size  # forward + backward
    rate = batch * seq * steps / seconds
    result = {"params": params, "params_without_embedding": n, "tokens_per_s": rate, "seconds": seconds,
              "loss_first_last": [losses[0], losses[-1]], "dtype": str(next(engine.module.parameters()).dtype)}
    for label, per_token in (("lora_4n", 4 * n + attention), ("dense_6n", 6 * n + attention)):
        flops = per_token * rate
        result[f"flops_{label}"] = flops
        result[f"mfu_{label}_measured_peak"] = flops / peak["bf16_measured"]
        if peak.get("bf16_nominal"):
            result[f"mfu_{label}_nominal_peak"] = flops / peak["bf16_nominal"]
    return result


def score_check(device: str, users: int, items: int, dim: int, block_users: int, peak: dict,
                budget_s: float = 150.0) -> dict:
    """Scores up to `users`, stopping after the block that passes `budget_s` (the check must fit
    the GPU machine's time): the rate is over the users done."""
    from distrec.score import bf16_bound
    from distrec.score.kernel import top_candidates

    gen = torch.Generator(device=device).manual_seed(0)
    table = torch.randn(items, dim, device=device, generator=gen)
    sample = torch.randn(block_users, dim, device=device, generator=gen)
    fast = top_candidates(sample, table, 100)  # warm-up, and the lists checked below
    exact = top_candidates(sample, table, 100, precision="fp32")
    same = float((fast[1] == exact[1]).float().mean())
    before = dict(bf16_bound.STATS)
    _sync(device)
    started = time.perf_counter()
    done = 0
    while done + block_users <= users and time.perf_counter() - started < budget_s:
        top_candidates(torch.randn(block_users, dim, device=device, generator=gen), table, 100)
        done += block_users
        _sync(device)
    seconds = time.perf_counter() - started
    flops = 2 * done * items * dim / seconds
    return {"users": done, "items": items, "dim": dim, "users_per_s": done / seconds, "seconds": seconds,
            "flops": flops, "fraction_of_bf16_measured": flops / peak["bf16_measured"],
            "lists_equal_to_fp32": same, "bf16_users": bf16_bound.STATS["bf16_users"] - before["bf16_users"],
            "fp32_again": bf16_bound.STATS["fp32_again"] - before["fp32_again"]}


def actor_check(device: str, num_users: int, num_items: int) -> dict:
    """The scoring actor's GPU path without Ray: BlockScorer on `device` against the CPU."""
    import pandas as pd

    from distrec.cli import main as distrec
    from distrec.config import load_config, to_dict
    from distrec.score.config import ScoreConfig
    from distrec.score.actor import BlockScorer
    from distrec.score.job import catalog_and_popularity

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assert distrec(["prepare", "--source", "synthetic", "--out", str(root / "data"), "--no-progress",
                        f"synthetic.num_users={num_users}", f"synthetic.num_items={num_items}"]) == 0
        started = time.perf_counter()
        assert distrec(["train", "--no-progress", f"data.dir={root / 'data'}", f"run.dir={root / 'run'}",
                        "trackers=[]", "model.item_repr=id", "model.dim=32", "model.max_len=20", "train.epochs=1"]) == 0
        train_seconds = time.perf_counter() - started
        lists, seconds = {}, {}
        for where in (device, "cpu"):
            out = root / f"recs-{len(lists)}"
            out.mkdir()
            cfg = load_config(ScoreConfig, None, ["k=10", "candidates=50", "precision=fp32"], base={
                "run": str(root / "run"), "data": str(root / "data"), "out": str(out), "device": where})
            items = pd.read_parquet(root / "data" / "items.parquet")
            table, popularity = catalog_and_popularity(cfg, items)
            scorer = BlockScorer(to_dict(cfg), table, popularity, where, job="gpu-check")
            blocks = -(-len(scorer.frame) // cfg.batch_size)
            started = time.perf_counter()
            for block in range(blocks):
                scorer.score_block(block)
            _sync(where)
            seconds[f"{len(lists)}:{where}"] = time.perf_counter() - started
            recs = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))])
            lists[len(lists)] = recs.sort_values(["user_id", "rank"])[["user_id", "item_id"]].to_numpy()
        a, b = lists[0], lists[1]
        same = float((a == b).all(axis=1).mean()) if a.shape == b.shape else 0.0
    return {"rows": int(len(b)), "rows_equal": same, "seconds": seconds, "train_seconds": train_seconds,
            "actor_device": device, "equal_shapes": bool(a.shape == b.shape), "users": num_users,
            "note": "fp32 on both; ties may order differently" if same < 1 else ""}


def ranker_part(device: str, toy: bool, peak: dict) -> dict:
    """The second stage on the GPU: the cross-encoder ranker's forward in bf16 over a batch of
    users' candidates (one pass per user, K = 50 in two passes of 25), against the peak."""
    from ranker_cost import ranker_check
    from transformers import BertConfig, BertModel

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if toy else \
        dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)  # MiniLM's shape
    backbone = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **shape))
    return ranker_check(backbone, device, 4 if toy else 256, 8 if toy else 50, 25, torch.bfloat16,
                        seconds=0.5 if toy else 10.0, peak=peak["bf16_measured"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def markdown(results: dict, command: str) -> str:
    peak, train, score, actor = (results.get(k, {}) for k in ("peak", "train", "score", "actor"))
    lines = [f"## GPU checks ({peak.get('card', '?')})", "", f"`{command}`", ""]
    for name, part in results.items():
        if isinstance(part, dict) and "skipped" in part:
            lines.append(f"- {name}: skipped: {part['skipped']}")
    if "bf16_measured" in peak:
        lines.append(f"- matrix-product peak: bf16 {peak['bf16_measured'] / 1e12:,.0f} TFLOP/s measured "
                     f"(nominal dense {(peak['bf16_nominal'] or 0) / 1e12:,.0f}), fp32 {peak['fp32_measured'] / 1e12:,.0f}")
    if "tokens_per_s" in train:
        lines.append(f"- LoRA training, {train['params'] / 1e6:,.0f}M-parameter decoder, bf16, ZeRO-2: "
                     f"{train['tokens_per_s']:,.0f} tokens/s; MFU (4N LoRA) {train['mfu_lora_4n_measured_peak']:.2f} of "
                     f"the measured peak, {train.get('mfu_lora_4n_nominal_peak', float('nan')):.2f} of the nominal; "
                     f"6N: {train['mfu_dense_6n_measured_peak']:.2f} / {train.get('mfu_dense_6n_nominal_peak', float('nan')):.2f}")
    ranker = results.get("ranker", {})
    if "candidates_per_s" in ranker:
        lines.append(f"- ranker (MiniLM-shaped cross-encoder, bf16, {ranker['users']} users x K={ranker['k']} per batch, "
                     f"{ranker['tokens_per_pass']} tokens per pass): {ranker['users_per_s']:,.0f} users/s, "
                     f"{ranker['candidates_per_s']:,.0f} candidates/s, {ranker['fraction_of_peak']:.2f} of the measured peak")
    if "users_per_s" in score:
        lines.append(f"- exact top-100, {score['users']:,} users x {score['items']:,} items x {score['dim']}: "
                     f"{score['users_per_s']:,.0f} users/s, {score['fraction_of_bf16_measured']:.2f} of the measured "
                     f"bf16 peak; {score['fp32_again']:,} of {score['bf16_users']:,} users redone in fp32; lists of "
                     f"8,192 users equal to fp32's at {score['lists_equal_to_fp32']:.4f}")
    if "rows" in actor:
        lines.append(f"- the scoring actor on {actor['actor_device']} against the CPU: {actor['rows']:,} rows, "
                     f"{actor['rows_equal']:.4f} equal; {actor['seconds']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at toy sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", HERE / "gpu_out")))
    parser.add_argument("--wheels", type=Path, help="install deepspeed, webdataset and their dependencies from here")
    parser.add_argument("--parts", default="peak,actor,train,score,ranker")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--publish", action="store_true", help="also write the section into BENCHMARKS.md")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    from distrec.console import quiet

    quiet()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python", *sys.argv]), "dry_run": args.dry_run, "torch": torch.__version__}

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))

    if not args.dry_run and not torch.cuda.is_available():
        results["error"] = "no CUDA device: use --dry-run on a CPU"
        save()
        print(results["error"], file=sys.stderr)
        return 2
    if args.wheels:
        try:
            results["wheels"] = install_wheels(args.wheels)
        except Exception as e:  # the parts that need them record why they were skipped
            results["wheels"] = f"failed: {type(e).__name__}: {e}"
    toy = args.dry_run
    parts = {
        "peak": lambda: peak_check(device, 0.3 if toy else 2.0, 512 if toy else 8192),
        "train": lambda: train_check(device, 2 if toy else args.steps, 2 if toy else 8, 32 if toy else 1024,
                                     dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4) if toy else
                                     dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, num_key_value_heads=16), results["peak"]),
        "score": lambda: score_check(device, 2048 if toy else 262_144, 20_000 if toy else 1_000_000, 64,
                                     1024 if toy else 8192, results["peak"]),
        "actor": lambda: actor_check(device, 300 if toy else 3000, 120 if toy else 800),
        "ranker": lambda: ranker_part(device, toy, results["peak"]),
    }
    for name in args.parts.split(","):
        started = time.perf_counter()
        try:
            if name != "peak" and "bf16_measured" not in results.get("peak", {}):
                raise RuntimeError("needs the peak part")
            results[name] = parts[name]()
        except Exception as e:
            results[name] = {"skipped": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                             "traceback": traceback.format_exc()[-2000:]}
        results[name]["part_seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'}, default=str)}",
              flush=True)
        save()
    text = markdown(results, results["command"])
    (args.out / "gpu_check.md").write_text(text)
    if args.publish and not args.dry_run:
        from _report import publish

        publish(text)
    skipped = [n for n in args.parts.split(",") if "skipped" in results[n]]
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
