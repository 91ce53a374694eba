"""The machine's limit: measured matrix-product peak in fp32 and bf16 (torch, all threads).

    python benchmarks/gemm.py [--size 2048] [--device cpu|cuda] [--no-append]

Other benchmarks report achieved FLOP/s as a fraction of this, measured in their own run
(`peak_flops()`), since absolute speed on shared machines drifts.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from _report import publish  # noqa: E402 (benchmarks/ is the script directory)


def peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, device: str = "cpu", seconds: float = 1.0) -> float:
    """Best FLOP/s of size x size x size products over about `seconds`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size ** 3 / (time.perf_counter() - t))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        flops = peak_flops(dtype, args.size, args.device, 2.0)
        rows.append(f"| {str(dtype).split('.')[-1]} | {args.size} | {flops / 1e9:,.0f} |")
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    publish("\n".join([f"## Matrix-product peak ({name})", "", f"`python benchmarks/gemm.py {' '.join(sys.argv[1:])}`", "",
                       "| dtype | n (n x n x n) | GFLOP/s |", "|---|---|---|", *rows, ""]), append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
