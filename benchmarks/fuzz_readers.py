"""Coverage-guided fuzzing (atheris, libFuzzer's mutator) of every reader of `distrec
prepare` and of the config loader: N mutated inputs each, starting from a valid file.

    python benchmarks/fuzz_readers.py [--runs 10000] [--no-append]       # every target, one process each
    python benchmarks/fuzz_readers.py --target recbole --runs 10000       # one target

A case passes when the reader either returns, with every row it read either kept or
counted as rejected (rows read - rows rejected = rows kept), or refuses the input with
distrec's own DataError / ConfigError (a message naming file and line). Anything else, a
traceback, is a failure: atheris stops and prints the input that caused it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEEDS = {
    "recbole": ("toy.inter", b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                b"u1\ta\t5\t1\nu1\tb\t4\t2\nu2\ta\t3\t3\nu2\tc\t1\t4\n"),
    "movielens": ("ratings.dat", b"1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n"),
    "table_csv": ("events.csv", b"user_id,item_id,timestamp,rating\nu1,a,1,5\nu1,b,2,4\n\"u,2\",a,3,3\n"),
    "table_jsonl": ("events.jsonl", b'{"user_id": "u1", "item_id": "a", "timestamp": 1}\n'
                    b'{"user_id": "u2", "item_id": "b", "timestamp": "2024-01-02T03:04:05"}\n'),
    "p5": ("sequential_data.txt", b"1 1 2 3\n2 2 3\n1 3\n"),
    "recbole_items": ("toy.item", b"item_id:token\ttitle:token_seq\tcategories:token_seq\n"
                      b"a\tA Title\tx y\nb\tB Title\tx\nc\tC\t\n"),
    "config": ("prepare.yaml", b"source: table\nfilter:\n  min_rating: 4\n  events: [buy, cart]\n"
               b"split:\n  mode: time\nshards:\n  max_history: 50\n"),
}


def fuzz_one(target: str, runs: int, report: Path) -> None:
    import atheris

    with atheris.instrument_imports():
        from distrec.config import ConfigError, load_config
        from distrec.data import readers
        from distrec.data.config import PrepareConfig
        from distrec.data.records import DataError

    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    name, seed = SEEDS[target]
    path = work / name
    # the companion files stay valid: the one file named in SEEDS is what is fuzzed
    companions = {
        "movielens": {"movies.dat": b"10::Toy Story (1995)::Animation|Comedy\n20::Jumanji (1995)::Adventure\n"},
        "p5": {"datamaps.json": json.dumps({"user2id": {"A": "1", "B": "2"},
                                            "item2id": {"a": "1", "b": "2", "c": "3"}}).encode(),
               "beauty.item": b"item_id:token\ttitle:token_seq\na\tA\nb\tB\nc\tC\n"},
        "recbole_items": {"toy.inter": SEEDS["recbole"][1]},
    }
    for companion, content in companions.get(target, {}).items():
        (work / companion).write_bytes(content)
    counts = {"cases": 0, "accepted": 0, "refused": 0, "rows_read": 0, "rows_rejected": 0}
    source = {"recbole": "recbole", "recbole_items": "recbole", "movielens": "movielens", "p5": "p5",
              "table_csv": "table", "table_jsonl": "table"}.get(target)
    reader = {"recbole": readers.read_recbole, "recbole_items": readers.read_recbole, "p5": readers.read_p5,
              "movielens": readers.read_movielens, "table_csv": readers.read_table,
              "table_jsonl": readers.read_table}.get(target)
    input_path = work / "toy.inter" if target == "recbole_items" else path

    def one(data: bytes) -> None:
        counts["cases"] += 1
        path.write_bytes(data)
        try:
            if target == "config":
                load_config(PrepareConfig, path)
            else:
                got = reader(PrepareConfig(source=source, input=str(input_path), on_bad_rows="skip"))
                c = got.item_counts if target == "recbole_items" else got.interaction_counts
                kept = len(got.items) if target == "recbole_items" else len(got.interactions)
                if c.rows_read - c.rows_rejected != kept:
                    raise AssertionError(f"rows read {c.rows_read} - rejected {c.rows_rejected} != kept {kept}")
                counts["rows_read"] += c.rows_read
                counts["rows_rejected"] += c.rows_rejected
            counts["accepted"] += 1
        except (DataError, ConfigError):
            counts["refused"] += 1
        if counts["cases"] % 500 == 0 or counts["cases"] == runs:
            report.write_text(json.dumps(counts))

    corpus = work / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(seed)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-seed=1", "-max_len=4096", str(corpus)], one)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=sorted(SEEDS))
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.target:
        fuzz_one(args.target, args.runs, args.report or Path(f"fuzz-{args.target}.json"))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in sorted(SEEDS):
            report = Path(tmp) / f"{target}.json"
            started = time.perf_counter()
            result = subprocess.run([sys.executable, __file__, "--target", target, "--runs", str(args.runs),
                                     "--report", str(report)], capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            seconds = time.perf_counter() - started
            counts = json.loads(report.read_text()) if report.exists() else {}
            crashed = result.returncode != 0
            rows.append((target, counts, seconds, crashed, result.stderr[-1500:] if crashed else ""))
            print(f"{target}: {counts} in {seconds:.0f} s, {'FAILED' if crashed else 'no traceback'}", flush=True)
    from _report import BENCHMARKS, publish  # benchmarks/ is the script directory

    lines = [f"| {t} | {c.get('cases', 0):,} | {c.get('accepted', 0):,} | {c.get('refused', 0):,} | "
             f"{c.get('rows_read', 0):,} | {c.get('rows_rejected', 0):,} | {'**traceback**' if bad else '0'} | {s:.0f} s |"
             for t, c, s, bad, _ in rows]
    failures = [f"{t}:\n```\n{err}\n```" for t, _, _, bad, err in rows if bad]
    publish("\n".join([
        "## Fuzzing the readers and the config loader (atheris, coverage-guided)", "",
        f"`python benchmarks/fuzz_readers.py {' '.join(sys.argv[1:])}`", "",
        "Accepted: the reader returned with rows read - rows rejected = rows kept (checked on every case); "
        "refused: distrec's own DataError/ConfigError, a message instead of a traceback (the CI test `tests/data/test_fuzz_readers.py` also checks it names the file). Rows are summed over the accepted cases.", "",
        "| target | cases | accepted | refused | rows read | rows rejected (counted) | tracebacks | time |",
        "|---|---|---|---|---|---|---|---|", *lines, "", *failures]), append=not args.no_append,
        path=BENCHMARKS.parent / "RELIABILITY.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
