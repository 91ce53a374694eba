"""Malformed input: a clear error naming file, line and expectation (exit 2), or, with
on_bad_rows=skip, the row dropped and counted in the manifest. Never a traceback."""

import json

import pytest

from tests.conftest import Prepared, write

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
GOOD = "u1\ta\t5\t1\nu1\tb\t4\t2\nu1\tc\t3\t3\nu1\td\t3\t4\nu2\ta\t1\t1\n"
ITEMS = "item_id:token\ttitle:token\na\tA\nb\tB\nc\tC\nd\tD\n"

# (name, bad line appended after GOOD, message expected, reason counted with skip)
BAD_ROWS = [
    ("wrong_columns", b"u3\ta\t5\n", "toy.inter:7: expected 4 columns (user_id, item_id, rating, timestamp), found 3",
     "wrong_column_count"),
    ("bad_number", b"u3\ta\tfive\t4\n", "toy.inter:7: rating 'five' is not a finite number", "bad_rating"),
    ("nan_time", b"u3\ta\t5\tnan\n", "toy.inter:7: timestamp 'nan' is not a number or ISO date", "bad_timestamp"),
    ("inf_rating", b"u3\ta\tinf\t4\n", "toy.inter:7: rating 'inf' is not a finite number", "bad_rating"),
    ("empty_user", b"\ta\t5\t4\n", "toy.inter:7: empty or invalid user id", "bad_user_id"),
    ("bad_utf8", b"u3\t\xff\xfe\t5\t4\n", "toy.inter:7: not UTF-8 (byte 0xff at column 4); if the file is Latin-1, set encoding=latin-1", "bad_encoding"),
    ("unknown_item", b"u3\tzz\t5\t4\n", "toy.inter:7: item 'zz' is not in the item catalog", "item_not_in_catalog"),
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
    assert m["rows_read"] == 6 and m["rows_rejected"] == 1 and m["rejections"] == {reason: 1}
    assert m["num_interactions"] == 5 and m["num_users"] == 2
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
    assert code == 2 and "toy.inter:7: a quoted field opened on this line is not closed" in err


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
    assert code == 2 and "already holds a distrec prepare output; pass --overwrite to replace it" in err


# --- cases found by review: each once produced a traceback or lost a row silently ----

def _jsonl(tmp_path, lines):
    return write(tmp_path / "e.jsonl", "".join(line + "\n" for line in lines))


GOOD_JSONL = ['{"user_id": "a", "item_id": "x", "ts": 1}', '{"user_id": "a", "item_id": "y", "ts": 2}',
              '{"user_id": "a", "item_id": "z", "ts": 3}', '{"user_id": "a", "item_id": "w", "ts": 4}']


@pytest.mark.parametrize("row, message, reason", [
    ('{"user_id": "a", "item_id": "v", "ts": null}', "e.jsonl:5: timestamp '' is not a number", "bad_timestamp"),
    ('{"user_id": "a", "item_id": "v"}', "e.jsonl:5: timestamp '' is not a number", "bad_timestamp"),
    ('{"user_id": "a", "item_id": NaN, "ts": 5}', "e.jsonl:5: empty or invalid item id", "bad_item_id"),
    ('{"item_id": "v", "ts": 5}', "e.jsonl:5: empty or invalid user id", "bad_user_id"),
    ('{"user_id": ["a"], "item_id": "v", "ts": 5}', "e.jsonl:5: empty or invalid user id", "bad_user_id"),
])
def test_table_rows_with_missing_values_are_rejected(cli, tmp_path, row, message, reason):
    path = _jsonl(tmp_path, GOOD_JSONL + [row])
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o")
    assert code == 2 and message in err, err
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o", "on_bad_rows=skip")
    m = Prepared(tmp_path / "o").manifest
    assert (m["rows_read"], m["rows_rejected"], m["rejections"], m["num_interactions"]) == (5, 1, {reason: 1}, 4)


def test_parquet_rows_are_numbered_as_rows(cli, tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"user_id": ["a", None, None, "a", "a", "a"], "item_id": ["x", "y", "y", "zz", "y", "w"],
                          "timestamp": [1, 2, 3, 4, 5, 6]})
    frame.to_parquet(tmp_path / "l.parquet")
    pd.DataFrame({"item_id": ["x", "y", "w"], "title": ["X", "Y", "W"]}).to_parquet(tmp_path / "i.parquet")
    code, err = cli("prepare", "--source", "table", "--input", tmp_path / "l.parquet", "--items",
                    tmp_path / "i.parquet", "--out", tmp_path / "o", "on_bad_rows=skip")
    m = Prepared(tmp_path / "o").manifest
    assert m["rejections"] == {"bad_user_id": 2, "item_not_in_catalog": 1}
    assert any("l.parquet:4: item 'zz'" in e for e in m["rejected_examples"])


def test_unclosed_quote_counts_every_line_it_swallows(cli, tmp_path):
    folder = tmp_path / "toy"
    write(folder / "toy.inter", HEADER + GOOD + 'u3\t"a\t5\t4\n' + "u3\tb\t5\t5\nu3\tc\t5\t6\n")
    write(folder / "toy.item", ITEMS)
    code, err = cli("prepare", "--source", "recbole", "--input", folder, "--out", tmp_path / "o")
    assert code == 2 and "toy.inter:7: expected 4 columns" in err and "from line 7 to 9" in err
    code, err = cli("prepare", "--source", "recbole", "--input", folder, "--out", tmp_path / "o", "on_bad_rows=skip")
    m = Prepared(tmp_path / "o").manifest
    assert (m["rows_read"], m["rows_rejected"]) == (8, 3)  # 5 good + the 3 lines inside the quote


def test_quoted_tab_inside_an_id_is_rejected(cli, tmp_path):
    folder = tmp_path / "toy"
    write(folder / "toy.inter", HEADER + GOOD + 'u1\t"a\tb"\t4\t2\n')
    write(folder / "toy.item", ITEMS)
    code, err = cli("prepare", "--source", "recbole", "--input", folder, "--out", tmp_path / "o")
    assert code == 2 and "toy.inter:7: empty or invalid item id" in err


def test_byte_order_mark_is_ignored(prepare, tmp_path):
    folder = tmp_path / "toy"
    write(folder / "toy.inter", b"\xef\xbb\xbf" + (HEADER + GOOD).encode())
    write(folder / "toy.item", b"\xef\xbb\xbf" + ITEMS.encode())
    assert prepare("recbole", folder).manifest["num_interactions"] == 5


@pytest.mark.parametrize("content, message", [
    (HEADER, "toy.inter: no interaction rows"),
    ("\n\n", "toy.inter:1: header column 1 is ''"),
])
def test_header_only_file_names_the_file(cli, tmp_path, content, message):
    folder = tmp_path / "toy"
    write(folder / "toy.inter", content)
    write(folder / "toy.item", ITEMS)
    code, err = cli("prepare", "--source", "recbole", "--input", folder, "--out", tmp_path / "o")
    assert code == 2 and (message in err or "no header line" in err), err


@pytest.mark.parametrize("args, message", [
    (["encoding=klingon"], "unknown text encoding 'klingon'"),
    (["split.seed=-1"], "split.seed must be >= 0"),
    (["synthetic.seed=-1"], "synthetic.seed must be >= 0"),
    (["split.mode=time", "split.test_fraction=0"], "split.test_fraction must be > 0"),
])
def test_bad_settings_are_config_errors(cli, tmp_path, args, message):
    code, err = cli("prepare", "--source", "synthetic", "--out", tmp_path / "o", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_output_paths_and_config_bytes(cli, tmp_path):
    write(tmp_path / "afile", "x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        code, err = cli("prepare", "--source", "synthetic", "--out", out, "--overwrite", "synthetic.num_users=20")
        assert code == 2 and str(tmp_path / "afile") in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"
    code, err = cli("prepare", "--source", "synthetic", "--out", ".", "--overwrite")
    assert code == 2 and "is the current directory or one above it" in err
    write(tmp_path / "bad.yaml", b"source: \xff\n")
    code, err = cli("prepare", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "o")
    assert code == 2 and "not valid UTF-8 YAML" in err


def test_p5_datamaps_of_the_wrong_shape(cli, tmp_path):
    write(tmp_path / "p" / "sequential_data.txt", "1 1 2\n")
    write(tmp_path / "p" / "datamaps.json", "[1, 2]")
    code, err = cli("prepare", "--source", "p5", "--input", tmp_path / "p", "--out", tmp_path / "o")
    assert code == 2 and "expected JSON with 'user2id' and 'item2id'" in err


@pytest.mark.parametrize("code, words", [(28, "No space left on device"), (13, "Permission denied")])
def test_full_disk_or_unwritable_output_is_clear_and_keeps_the_last_output(cli, tmp_path, monkeypatch, code, words):
    """Fault injection: the disk fills (or refuses) while the shards are written over a good
    earlier output. Exit 1 with the file and the reason, the earlier output untouched, no
    staging directory left behind."""
    import os

    from distrec.data import prepare as prepare_module

    out = tmp_path / "out"
    assert cli("prepare", "--source", "synthetic", "--out", out, "synthetic.num_users=60")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = prepare_module.write_shards

    def failing(samples, out_dir, *args, **kwargs):
        real(samples[:5], out_dir, *args, **kwargs)  # part of the work lands, then the disk says no
        raise OSError(code, os.strerror(code), str(out_dir / "train-00001.tar"))

    monkeypatch.setattr(prepare_module, "write_shards", failing)
    status, err = cli("prepare", "--source", "synthetic", "--out", out, "--overwrite", "synthetic.num_users=80")
    assert status == 1 and "train-00001.tar" in err and words in err and "unchanged" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
