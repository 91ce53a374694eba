"""Shared by the benchmark scripts: best-of-N timing, and printing a result section into BENCHMARKS.md.

A section is keyed by its first line (the `## ` heading): a re-run replaces the section it
made before instead of appending a second copy, so BENCHMARKS.md holds the latest figures.
"""

import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
FIGURES = Path(__file__).resolve().parent / "figures"


def publish(text: str, append: bool = True, path: Path = BENCHMARKS) -> None:
    print(text)
    if not append:
        return
    heading = text.strip().splitlines()[0]
    old = path.read_text() if path.exists() else ""
    start = old.find(heading + "\n") if heading.startswith("## ") else -1
    if start >= 0:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text.strip() + "\n" + (old[end:] if end >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text.strip() + "\n"
    path.write_text(new)


def best_of(fn, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` calls after one warm-up (shared machines are noisy)."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)
