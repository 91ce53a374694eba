"""What the second stage costs: the cross-encoder ranker's forward over batches of users'
candidates, candidates/s and users/s, its FLOP/s against the matrix-product peak measured in
the same run, one pass per user (listwise, per_pass = K) against one pass per candidate
(pointwise, per_pass = 1), fp32 and bf16.

    python benchmarks/ranker_cost.py [--backbone all-MiniLM-L6-v2] [--users 64] [--k 20,50] [--no-append]

The backbone is the real one (distrec's loader, LoRA as in training); the item texts are
random token strings of the configured budget, so the cost is that of a real pass.
`benchmarks/gpu_check.py` runs `ranker_check` on a GPU (bf16, a larger batch).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from gemm import peak_flops  # noqa: E402 (benchmarks/ is the script directory)


class _RandomTokens:
    """A tokenizer stand-in: every text is `length` random ids (the cost of a real text of that budget)."""

    def __init__(self, vocab: int, length: int, cls: int | None, sep: int, pad: int):
        self.vocab, self.length = vocab, length
        self.cls_token_id, self.sep_token_id, self.pad_token_id = cls, sep, pad
        self.bos_token_id = self.eos_token_id = None

    def __call__(self, texts, **_):
        g = torch.Generator().manual_seed(0)
        return {"input_ids": [torch.randint(5, self.vocab, (self.length,), generator=g).tolist() for _ in texts]}


def forward_flops(backbone, tokens: int, length: int) -> float:
    """2 x (weights outside the embeddings) per token, plus attention's 4 x layers x length x hidden."""
    config = backbone.config
    embedding = sum(p.numel() for n, p in backbone.named_parameters() if "embed" in n)
    n = sum(p.numel() for p in backbone.parameters()) - embedding
    return tokens * (2 * n + 4 * config.num_hidden_layers * length * config.hidden_size)


def ranker_check(backbone, device: str, users: int, k: int, per_pass: int, dtype, item_tokens: int = 10,
                 history_tokens: int = 40, history_items: int = 5, seconds: float = 3.0, peak: float | None = None,
                 num_items: int = 5000) -> dict:
    """Score `users` x `k` candidates repeatedly for about `seconds`; the rates and FLOP/s."""
    from distrec.models.ranker import Ranker, RankerConfig

    config = backbone.config
    sep = getattr(config, "sep_token_id", None) or getattr(config, "eos_token_id", None) or 2
    tokens = _RandomTokens(config.vocab_size, item_tokens, getattr(config, "cls_token_id", None) or 1, sep, 0)
    cfg = RankerConfig(per_pass=per_pass, item_tokens=item_tokens, history_tokens=history_tokens,
                       history_items=history_items)
    ranker = Ranker(cfg, backbone, tokens, [""] * num_items, num_items).to(device).eval()
    g = torch.Generator().manual_seed(1)
    histories = [torch.randint(0, num_items, (history_items,), generator=g).tolist() for _ in range(users)]
    candidates = torch.randint(0, num_items, (users, k), generator=g)
    ids, mask, *_ = ranker.passes(histories, candidates)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        ranker.score(histories, candidates, batch_size=users)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started, rounds = time.perf_counter(), 0
        while time.perf_counter() - started < seconds or rounds < 2:
            ranker.score(histories, candidates, batch_size=users)
            rounds += 1
        if device == "cuda":
            torch.cuda.synchronize()
    elapsed = (time.perf_counter() - started) / rounds
    flops = forward_flops(backbone, int(mask.sum()), ids.shape[1]) / elapsed
    result = {"users": users, "k": k, "per_pass": per_pass, "dtype": str(dtype).replace("torch.", ""),
              "passes": int(ids.shape[0]), "tokens_per_pass": int(ids.shape[1]),
              "users_per_s": users / elapsed, "candidates_per_s": users * k / elapsed, "flops": flops}
    if peak:
        result["fraction_of_peak"] = flops / peak
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--k", default="20,50")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    from distrec.console import quiet
    from distrec.models.backbone import load_backbone

    quiet()
    backbone, _ = load_backbone(args.backbone)
    peaks = {torch.float32: peak_flops(torch.float32, 2048, "cpu", 2.0),
             torch.bfloat16: peak_flops(torch.bfloat16, 2048, "cpu", 2.0)}
    rows = []
    for k in map(int, args.k.split(",")):
        for per_pass, label in ((min(k, 25), "listwise (one pass per <=25 candidates)"), (1, "pointwise (a pass per candidate)")):
            for dtype in (torch.float32, torch.bfloat16):
                users = args.users if per_pass > 1 else max(2, args.users // 8)
                r = ranker_check(backbone, "cpu", users, k, per_pass, dtype, seconds=args.seconds, peak=peaks[dtype])
                rows.append((label, r))
                print(f"{label:42s} K={k:3d} {r['dtype']:8s} {r['tokens_per_pass']:4d} tokens/pass "
                      f"{r['users_per_s']:8.1f} users/s {r['candidates_per_s']:8.1f} cand/s "
                      f"{r['flops'] / 1e9:6.1f} GFLOP/s ({r['fraction_of_peak']:.2f} of peak)", flush=True)
    lines = [f"## The ranker's forward cost ({args.backbone}, {platform.machine()}, {torch.get_num_threads()} threads)",
             "", f"`python benchmarks/ranker_cost.py --backbone {args.backbone} --users {args.users} --k {args.k}`", "",
             f"Matrix-product peak measured in the same run: fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, "
             f"bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s. Item texts of 10 tokens, history 40 tokens (5 items).",
             "", "| layout | K | dtype | tokens per pass | users/s | candidates/s | GFLOP/s | fraction of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['k']} | {r['dtype']} | {r['tokens_per_pass']} | {r['users_per_s']:,.1f} | "
                     f"{r['candidates_per_s']:,.0f} | {r['flops'] / 1e9:.1f} | {r['fraction_of_peak']:.2f} |")
    text = "\n".join(lines) + "\n"
    if not args.no_append:
        from _report import publish

        publish(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
