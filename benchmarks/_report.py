"""Shared by the benchmark scripts: print a result section and append it to BENCHMARKS.md."""

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def publish(text: str, append: bool = True) -> None:
    print(text)
    if append:
        with open(BENCHMARKS, "a") as fh:
            fh.write("\n" + text)
