"""The fast part of the fuzzing (benchmarks/fuzz_readers.py runs 10,000 coverage-guided
cases per target): a few hundred random mutations of a valid file per reader. Every case
either reads, with every row kept or counted as rejected, or is refused with distrec's own
error naming the file; never a traceback."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distrec.config import ConfigError, load_config
from distrec.data import readers
from distrec.data.config import PrepareConfig
from distrec.formats import DataError

TARGETS = {  # reader: (file fuzzed, valid seed, companion files kept valid, source)
    "recbole": ("toy.inter", b"user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ta\t5\t1\n"
                b"u1\tb\t4\t2\nu2\ta\t3\t3\n", {}, "recbole"),
    "movielens": ("ratings.dat", b"1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n",
                  {"movies.dat": b"10::Toy Story (1995)::Animation|Comedy\n20::Jumanji (1995)::Adventure\n"},
                  "movielens"),
    "p5": ("sequential_data.txt", b"1 1 2 3\n2 2 3\n",
           {"datamaps.json": json.dumps({"user2id": {"A": "1", "B": "2"},
                                         "item2id": {"a": "1", "b": "2", "c": "3"}}).encode(),
            "x.item": b"item_id:token\ttitle:token_seq\na\tA\nb\tB\nc\tC\n"}, "p5"),
    "table_csv": ("events.csv", b"user_id,item_id,timestamp\nu1,a,1\nu1,b,2\n\"u,2\",a,3\n", {}, "table"),
    "table_jsonl": ("events.jsonl", b'{"user_id": "u1", "item_id": "a", "timestamp": 1}\n'
                    b'{"user_id": "u2", "item_id": "b", "timestamp": "2024-01-02"}\n', {}, "table"),
    "config": ("prepare.yaml", b"source: table\nfilter:\n  min_rating: 4\nsplit:\n  mode: time\n", {}, None),
}
EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["insert", "delete", "replace"]),
                           st.sampled_from([b"\t", b",", b"\n", b'"', b":", b"::", b"\xff", b"\x00", b"nan", b"inf",
                                            b"-1", b"1e309", b"{", b"[", b" ", b"9" * 30, b"\r", b"\xef\xbb\xbf"])),
                 max_size=8)


def mutate(seed: bytes, edits) -> bytes:
    data = bytearray(seed)
    for position, op, piece in edits:
        at = position % (len(data) + 1)
        if op == "insert":
            data[at:at] = piece
        elif op == "delete":
            del data[at:at + len(piece)]
        else:
            data[at:at + len(piece)] = piece
    return bytes(data)


@pytest.mark.parametrize("target", TARGETS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS)
def test_mutated_input_is_read_and_counted_or_refused_clearly(target, edits, tmp_path_factory):
    name, seed, companions, source = TARGETS[target]
    work = tmp_path_factory.mktemp(target)
    for companion, content in companions.items():
        (work / companion).write_bytes(content)
    path = work / name
    path.write_bytes(mutate(seed, edits))
    try:
        if source is None:
            load_config(PrepareConfig, path)
            return
        got = getattr(readers, f"read_{source}")(PrepareConfig(source=source, input=str(path), on_bad_rows="skip",
                                                                progress=False))
    except (DataError, ConfigError) as e:
        assert str(path.parent) in str(e) or path.name in str(e) or "config" in str(e).lower() or source is None
        return
    counts = got.interaction_counts
    assert counts.rows_read - counts.rows_rejected == len(got.interactions)
    assert sum(counts.rejections.values()) == counts.rows_rejected
