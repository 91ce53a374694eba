"""Malformed input: a clear error naming file, line and expectation (exit 2), or, with
on_bad_rows=skip, the row dropped and counted in the manifest. Never a traceback."""

import json

import pytest

from tests.conftest import Prepared, write

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
GOOD = "u1\ta\t5\t1\nu1\tb\t4\t2\nu1\tc\t3\t3\nu2\ta\t1\t1\n"
ITEMS = "item_id:token\ttitle:token\na\tA\nb\tB\nc\tC\n"

# (name, bad line appended after GOOD, message expected, reason counted with skip)
BAD_ROWS = [
    ("wrong_columns", b"u3\ta\t5\n", "toy.inter:6: expected 4 columns (user_id, item_id, rating, timestamp), found 3",
     "wrong_column_count"),
    ("bad_number", b"u3\ta\tfive\t4\n", "toy.inter:6: rating 'five' is not a finite number", "bad_rating"),
    ("nan_time", b"u3\ta\t5\tnan\n", "toy.inter:6: timestamp 'nan' is not a number or ISO date", "bad_timestamp"),
    ("inf_rating", b"u3\ta\tinf\t4\n", "toy.inter:6: rating 'inf' is not a finite number", "bad_rating"),
    ("empty_user", b"\ta\t5\t4\n", "toy.inter:6: empty user id", "empty_user_id"),
    ("bad_utf8", b"u3\t\xff\xfe\t5\t4\n", "toy.inter:6: the line is not valid utf-8", "bad_encoding"),
    ("unknown_item", b"u3\tzz\t5\t4\n", "toy.inter:6: item 'zz' is not in the item catalog", "item_not_in_catalog"),
]


def _toy(tmp_path, extra: bytes = b"", header: str = HEADER):
    folder = tmp_path / "toy"
    write(folder / "toy.inter", header.encode() + GOOD.encode() + extra)
    write(folder / "toy.item", ITEMS)
    return folder


@pytest.mark.parametrize("name, line, message, reason", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_row_is_an_error_naming_file_and_line(cli, tmp_path, name, line, message, reason):
    out = tmp_path / "out"
    code, err = cli("prepare", "--source", "recbole", "--input", _toy(tmp_path, line), "--out", out)
    assert code == 2
    assert message in err and "on_bad_rows=skip" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


@pytest.mark.parametrize("name, line, message, reason", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_row_skipped_is_counted(cli, tmp_path, name, line, message, reason):
    out = tmp_path / "out"
    code, err = cli("prepare", "--source", "recbole", "--input", _toy(tmp_path, line), "--out", out,
                    "on_bad_rows=skip")
    assert code == 0, err
    m = Prepared(out).manifest
    assert m["rows_read"] == 5 and m["rows_rejected"] == 1 and m["rejections"] == {reason: 1}
    assert m["num_interactions"] == 4 and m["num_users"] == 2
    assert message in m["rejected_examples"][0]


@pytest.mark.parametrize("setup, message", [
    (lambda p: write(p / "toy" / "toy.inter", b""), "toy.inter: RecBole interaction file is empty"),
    (lambda p: (p / "toy").mkdir(), "expected exactly one .inter file in the directory, found 0"),
    (lambda p: write(p / "toy" / "toy.inter", "user_id:token\titem:token\nu\ti\n"),
     "toy.inter: expected a item id column (one of item_id); the header has: user_id, item"),
    (lambda p: write(p / "toy" / "toy.inter", "user_id:token\titem_id:tokn\n"),
     "toy.inter:1: header column 2 is 'item_id:tokn'; expected name:type"),
    (lambda p: write(p / "toy" / "toy.inter", "user_id:token\tuser_id:token\n"),
     "toy.inter:1: header names column 'user_id' twice"),
])
def test_unusable_files_fail_in_both_modes(cli, tmp_path, setup, message):
    setup(tmp_path)
    for policy in ("error", "skip"):
        code, err = cli("prepare", "--source", "recbole", "--input", tmp_path / "toy", "--out", tmp_path / "o",
                        f"on_bad_rows={policy}")
        assert code == 2 and message in err and "Traceback" not in err, err


def test_missing_input_and_unknown_key(cli, tmp_path):
    code, err = cli("prepare", "--source", "recbole", "--input", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2 and "nope: input not found" in err
    code, err = cli("prepare", "--source", "synthetic", "--out", tmp_path / "o", "synthetic.num_user=3")
    assert code == 2 and "did you mean 'num_users'" in err


def test_unterminated_quote_is_named(cli, tmp_path):
    lines = "".join(f"u{i}\ta\t5\t{i}\n" for i in range(20))
    folder = tmp_path / "toy"
    write(folder / "toy.inter", HEADER + GOOD + 'u9\t"a\t5\t1\n' + lines)
    write(folder / "toy.item", ITEMS)
    code, err = cli("prepare", "--source", "recbole", "--input", folder, "--out", tmp_path / "o")
    assert code == 2 and "toy.inter:6: a quoted field opened on this line is not closed" in err


def test_p5_unknown_index_counts_every_interaction_of_the_line(cli, tmp_path):
    folder = tmp_path / "p5"
    write(folder / "sequential_data.txt", "1 1 2 3\n2 1 9 2\n")
    write(folder / "datamaps.json", json.dumps({"user2id": {"A": "1", "B": "2"},
                                                 "item2id": {"X": "1", "Y": "2", "Z": "3"}}))
    write(folder / "d.item", "item_id:token\ttitle:token\nX\tx\nY\ty\nZ\tz\n")
    code, err = cli("prepare", "--source", "p5", "--input", folder, "--out", tmp_path / "o")
    assert code == 2 and "sequential_data.txt:2: item index '9' is not in datamaps.json" in err
    code, err = cli("prepare", "--source", "p5", "--input", folder, "--out", tmp_path / "o", "on_bad_rows=skip")
    m = Prepared(tmp_path / "o").manifest
    assert (m["rows_read"], m["rows_rejected"], m["rejections"]) == (6, 3, {"unknown_index": 3})


def test_table_bad_json_and_missing_column(cli, tmp_path):
    path = write(tmp_path / "e.jsonl", '{"user_id": "a", "item_id": "x", "ts": 1}\n{broken\n'
                 '{"user_id": "a", "item_id": "y", "ts": 2}\n{"user_id": "a", "item_id": "z", "ts": 3}\n')
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o")
    assert code == 2 and "e.jsonl:2: expected one JSON object per line" in err
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o", "on_bad_rows=skip")
    assert code == 0 and Prepared(tmp_path / "o").manifest["rejections"] == {"bad_json": 1}
    csv = write(tmp_path / "e.csv", "who,what\na,x\n")
    code, err = cli("prepare", "--source", "table", "--input", csv, "--out", tmp_path / "o2")
    assert code == 2 and "expected a user id column" in err and "columns.user=NAME" in err


def test_existing_output_is_kept_unless_overwrite(cli, tmp_path):
    out = tmp_path / "o"
    assert cli("prepare", "--source", "synthetic", "--out", out, "synthetic.num_users=50")[0] == 0
    code, err = cli("prepare", "--source", "synthetic", "--out", out)
    assert code == 2 and "already exists; pass --overwrite" in err
