"""Ordinary user mistakes with `distrec prepare` and the data it writes (issue 14): nothing
the user owns is ever deleted, and each mistake gets a message saying what to do."""

import gzip
import json
import warnings

import pytest

from distrec.outputs import MARKER
from tests.conftest import Prepared, write

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
GOOD = "u1\ta\t5\t1\nu1\tb\t4\t2\nu1\tc\t3\t3\nu1\td\t3\t4\nu2\ta\t1\t1\n"
ITEMS = "item_id:token\ttitle:token\na\tA\nb\tB\nc\tC\nd\tD\n"
CSV = "user_id,item_id,timestamp\n" + "".join(f"u{u},i{i},{1_700_000_000 + 60 * (10 * u + i)}\n"
                                              for u in range(4) for i in range(4))


def _snapshot(root):
    """Every file under `root` with its bytes: equal before and after = nothing lost or written."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- data lost: --out names the input, a folder holding it, or a folder of the user's ---------

def _input_folder(tmp_path):
    """--out is the RecBole input folder itself."""
    folder = tmp_path / "toy"
    write(folder / "toy.inter", HEADER + GOOD)
    write(folder / "toy.item", ITEMS)
    return ["--source", "recbole", "--input", folder], folder


def _parent_of_input(tmp_path):
    """--out is the folder holding the input CSV."""
    raw = tmp_path / "raw"
    write(raw / "log.csv", CSV)
    return ["--source", "table", "--input", raw / "log.csv"], raw


def _grandparent_of_input(tmp_path):
    """--out is a folder above the one holding the input."""
    write(tmp_path / "data" / "raw" / "log.csv", CSV)
    return ["--source", "table", "--input", tmp_path / "data" / "raw" / "log.csv"], tmp_path / "data"


def _users_folder(tmp_path):
    """--out is a folder with a file distrec did not write."""
    write(tmp_path / "raw" / "log.csv", CSV)
    write(tmp_path / "mine" / "notes.txt", "my notes\n")
    return ["--source", "table", "--input", tmp_path / "raw" / "log.csv"], tmp_path / "mine"


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("setup, words", [
    (_input_folder, "is the input"), (_parent_of_input, "holds the input"),
    (_grandparent_of_input, "holds the input"), (_users_folder, "not written by distrec"),
], ids=["out_is_input_folder", "out_is_parent_of_input", "out_is_grandparent", "out_holds_users_file"])
def test_prepare_never_replaces_inputs_or_a_users_folder(cli, tmp_path, setup, words, overwrite):
    args, out = setup(tmp_path)
    before = _snapshot(tmp_path)
    code, err = cli("prepare", *args, "--out", out, *(["--overwrite"] if overwrite else []))
    assert code == 2, err
    assert words in err and str(out) in err and "Traceback" not in err
    assert "--overwrite" not in err  # the flag would not help: never advise it
    assert _snapshot(tmp_path) == before  # inputs byte-identical, nothing written, no staging left


def test_overwrite_replaces_an_earlier_prepare_output(cli, tmp_path):
    out = tmp_path / "o"
    assert cli("prepare", "--source", "synthetic", "--out", out, "synthetic.num_users=50")[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["stage"] == "prepare"
    before = _snapshot(tmp_path)
    code, err = cli("prepare", "--source", "synthetic", "--out", out, "synthetic.num_users=60")
    assert code == 2 and "pass --overwrite to replace it" in err
    assert _snapshot(tmp_path) == before
    assert cli("prepare", "--source", "synthetic", "--out", out, "--overwrite", "synthetic.num_users=60")[0] == 0
    assert Prepared(out).manifest["num_users"] == 60 and (out / MARKER).is_file()


def test_overwrite_replaces_an_output_written_before_the_marker(cli, tmp_path):
    out = tmp_path / "o"
    assert cli("prepare", "--source", "synthetic", "--out", out, "synthetic.num_users=50")[0] == 0
    (out / MARKER).unlink()  # as written by an earlier distrec: recognised by its manifest
    assert cli("prepare", "--source", "synthetic", "--out", out, "--overwrite", "synthetic.num_users=60")[0] == 0
    assert Prepared(out).manifest["num_users"] == 60


def test_marker_records_the_source_files(cli, tmp_path):
    args, _ = _parent_of_input(tmp_path)
    assert cli("prepare", *args, "--out", tmp_path / "o")[0] == 0
    marker = json.loads((tmp_path / "o" / MARKER).read_text())
    manifest = Prepared(tmp_path / "o").manifest
    assert marker["inputs"] == {f["path"]: f["sha256"] for f in manifest["sources"]} and marker["inputs"]


# --- a missing shard is an incomplete dataset, not a full disk ---------------------------------

@pytest.fixture
def two_shards(cli, tmp_path):
    data = tmp_path / "data"
    assert cli("prepare", "--source", "synthetic", "--out", data, "synthetic.num_users=60",
               "synthetic.num_items=30", "synthetic.mean_length=6", "shards.samples_per_shard=25")[0] == 0
    assert (data / "train-00001.tar").is_file()
    return data


def test_missing_shard_is_named_before_training(two_shards):
    from distrec.formats import DataError
    from distrec.data.shards import ShardedSamples

    (two_shards / "train-00001.tar").unlink()
    with pytest.raises(DataError) as e:
        ShardedSamples(two_shards, batch_size=8)
    message = str(e.value)
    assert "train-00001.tar" in message and "incomplete" in message
    assert "prepare it again or restore the file" in message
    assert f"distrec prepare --verify {two_shards}" in message


def test_shard_vanishing_during_reading_is_named(two_shards):
    from distrec.formats import DataError
    from distrec.data.shards import ShardedSamples

    samples = ShardedSamples(two_shards, batch_size=8, shuffle=False)
    (two_shards / "train-00001.tar").unlink()
    with pytest.raises(DataError, match=r"train-00001.tar: .*incomplete.*prepare it again or restore the file"):
        list(samples)


def test_train_on_a_dataset_missing_a_shard_exits_2(cli, two_shards, tmp_path):
    (two_shards / "train-00001.tar").unlink()
    code, err = cli("train", "--no-progress", f"data.dir={two_shards}", f"run.dir={tmp_path / 'run'}",
                    "model.item_repr=id", "model.dim=8", "model.heads=2", "train.max_steps=2", "train.batch_size=8")
    assert code == 2, err
    assert "train-00001.tar" in err and "prepare it again or restore the file" in err
    assert "while train was writing" not in err and "Free space" not in err


# --- files that are not what the reader expects ---------------------------------------------

@pytest.mark.parametrize("name", ["log.csv.gz", "log.csv"], ids=["gz_extension", "gzip_named_csv"])
def test_gzip_csv_is_read(prepare, tmp_path, name):
    write(tmp_path / "plain.csv", CSV)
    write(tmp_path / "gz" / name, gzip.compress(CSV.encode()))
    plain = prepare("table", tmp_path / "plain.csv", out=tmp_path / "a")
    zipped = prepare("table", tmp_path / "gz" / name, out=tmp_path / "b")
    assert zipped.manifest["num_interactions"] == plain.manifest["num_interactions"] == 16
    assert zipped.manifest["rows_read"] == 16
    assert zipped.test.equals(plain.test)


def test_gzip_jsonl_is_read(prepare, tmp_path):
    rows = "".join(json.dumps({"user_id": f"u{u}", "item_id": f"i{i}", "ts": 10 * u + i}) + "\n"
                   for u in range(3) for i in range(3))
    write(tmp_path / "e.jsonl.gz", gzip.compress(rows.encode()))
    assert prepare("table", tmp_path / "e.jsonl.gz").manifest["num_interactions"] == 9


@pytest.mark.parametrize("suffix", ["bz2", "xz"])
def test_bzip2_and_xz_csv_are_read(prepare, tmp_path, suffix):
    import bz2
    import lzma

    packed = (bz2.compress if suffix == "bz2" else lzma.compress)(CSV.encode())
    path = write(tmp_path / f"log.csv.{suffix}", packed)
    assert prepare("table", path).manifest["num_interactions"] == 16


@pytest.mark.parametrize("name, content, message", [
    ("cut.csv.gz", gzip.compress(CSV.encode())[:-30], "cut.csv.gz:"),
    ("log.zip", b"PK\x03\x04" + b"\0" * 40, "log.zip: is a zip archive: unzip it and pass the file inside"),
    ("log.parquet.gz", gzip.compress(b"PAR1" * 20), "log.parquet.gz: is gzip-compressed; Parquet compresses inside"),
], ids=["truncated_gzip", "zip", "gzipped_parquet"])
def test_compressed_files_that_cannot_be_read_are_named(cli, tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    code, err = cli("prepare", "--source", "table", "--input", path, "columns.format=" +
                    ("parquet" if "parquet" in name else "csv"), "--out", tmp_path / "o")
    assert code == 2 and message in err and "Traceback" not in err and "writing" not in err, err
    if name == "cut.csv.gz":
        assert "gzip stream is truncated or corrupt" in err


def test_latin1_file_gets_the_encoding_hint(cli, prepare, tmp_path):
    path = write(tmp_path / "lat.csv", (CSV + "u9,caf\xe9,1700009999\n").encode("latin-1"))
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o")
    assert code == 2, err
    assert "lat.csv:18: not UTF-8 (byte 0xe9 at column 7)" in err, err
    assert "if the file is Latin-1, set encoding=latin-1" in err
    data = prepare("table", path, "encoding=latin-1", out=tmp_path / "o")
    assert "café" in set(data.items["item_id"])


def test_latin1_header_gets_the_encoding_hint(cli, tmp_path):
    path = write(tmp_path / "lat.csv", ("user_id,item_id,heure_é\n" + "u1,a,1\n").encode("latin-1"))
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o")
    assert code == 2 and "lat.csv:1: not UTF-8 (byte 0xe9" in err and "set encoding=latin-1" in err, err


@pytest.mark.parametrize("sep, shown", [(";", "';'"), ("\t", "'\\t'"), ("|", "'|'")], ids=["semicolon", "tab", "pipe"])
def test_other_separator_is_named(cli, prepare, tmp_path, sep, shown):
    path = write(tmp_path / "log.csv", CSV.replace(",", sep))
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o")
    assert code == 2, err
    assert f"looks separated by {shown}" in err and "columns.separator" in err, err
    value = "\\t" if sep == "\t" else sep
    assert prepare("table", path, f"columns.separator={value}").manifest["num_interactions"] == 16


def test_bad_separator_setting_is_a_config_error(cli, tmp_path):
    code, err = cli("prepare", "--source", "synthetic", "--out", tmp_path / "o", "columns.separator=ab")
    assert code == 2 and "columns.separator" in err and "one character" in err, err


# --- warnings users need ----------------------------------------------------------------------

def test_no_catalog_is_a_warning(cli, tmp_path):
    path = write(tmp_path / "log.csv", CSV)
    code, err = cli("prepare", "--source", "table", "--input", path, "--out", tmp_path / "o")
    assert code == 0, err
    warning = "no item catalog: every item text is empty, so text models cannot learn; pass --items FILE"
    assert warning in Prepared(tmp_path / "o").manifest["notes"]["warnings"]
    assert "warning:" in err and "no item catalog" in err


def test_recbole_without_item_file_is_a_warning(cli, tmp_path):
    write(tmp_path / "toy" / "toy.inter", HEADER + GOOD)
    assert cli("prepare", "--source", "recbole", "--input", tmp_path / "toy", "--out", tmp_path / "o")[0] == 0
    assert any("no item catalog" in w for w in Prepared(tmp_path / "o").manifest["notes"]["warnings"])
    write(tmp_path / "toy" / "toy.item", ITEMS)
    assert cli("prepare", "--source", "recbole", "--input", tmp_path / "toy", "--out", tmp_path / "p")[0] == 0
    assert not Prepared(tmp_path / "p").manifest["notes"].get("warnings")


def test_catalog_without_any_text_is_a_warning(cli, tmp_path):
    path = write(tmp_path / "log.csv", CSV)
    items = write(tmp_path / "items.csv", "item_id,price\n" + "".join(f"i{i},{i}\n" for i in range(4)))
    assert cli("prepare", "--source", "table", "--input", path, "--items", items, "--out", tmp_path / "o")[0] == 0
    assert any(w.startswith("every item text is empty") for w in Prepared(tmp_path / "o").manifest["notes"]["warnings"])


def _times_csv(tmp_path, times):
    rows = "".join(f"u{n % 3},i{n},{t}\n" for n, t in enumerate(times))
    return write(tmp_path / "t.csv", "user_id,item_id,timestamp\n" + rows)


def test_timestamps_mixing_seconds_and_milliseconds_warn(cli, tmp_path):
    seconds = [1_700_000_000 + 3600 * n for n in range(12)]
    millis = [1_700_050_000_123 + 1000 * n for n in range(3)]
    path = _times_csv(tmp_path, seconds + millis)
    items = write(tmp_path / "c.csv", "item_id,title\n" + "".join(f"i{n},T{n}\n" for n in range(15)))
    code, err = cli("prepare", "--source", "table", "--input", path, "--items", items, "--out", tmp_path / "o")
    assert code == 0, err
    found = [w for w in Prepared(tmp_path / "o").manifest["notes"]["warnings"] if "milliseconds" in w]
    assert len(found) == 1, found
    assert "12 look like seconds" in found[0] and "3 like milliseconds" in found[0]
    assert "t.csv: timestamps mix units" in found[0] and "line 14: 1700050000123" in found[0]  # an example
    assert "warning:" in err and "milliseconds" in err


def test_absurd_timestamps_warn(cli, tmp_path):
    good = [1_700_000_000 + 3600 * n for n in range(12)]
    path = _times_csv(tmp_path, good + [0, 5, 4_000_000_000])
    items = write(tmp_path / "c.csv", "item_id,title\n" + "".join(f"i{n},T{n}\n" for n in range(15)))
    code, err = cli("prepare", "--source", "table", "--input", path, "--items", items, "--out", tmp_path / "o")
    assert code == 0, err
    found = [w for w in Prepared(tmp_path / "o").manifest["notes"]["warnings"] if "1990" in w]
    assert len(found) == 1, found
    assert "t.csv: 3 timestamps are before 1990-01-01" in found[0] and "line 14: 0, line 15: 5" in found[0]


@pytest.mark.parametrize("times", [
    list(range(1, 16)),  # positions, not epoch times: an order only
    [f"2024-01-{d:02d}T10:00:00" for d in range(1, 16)],  # ISO dates
    [1_700_000_000_000 + 1000 * n for n in range(15)],  # all milliseconds: one unit
], ids=["ordinal", "iso", "all_milliseconds"])
def test_consistent_timestamps_do_not_warn(cli, tmp_path, times):
    path = _times_csv(tmp_path, times)
    items = write(tmp_path / "c.csv", "item_id,title\n" + "".join(f"i{n},T{n}\n" for n in range(15)))
    code, err = cli("prepare", "--source", "table", "--input", path, "--items", items, "--out", tmp_path / "o")
    assert code == 0, err
    assert not Prepared(tmp_path / "o").manifest["notes"].get("warnings"), err


# --- quiet: no library warning reaches the user ----------------------------------------------

def test_prepare_on_tiny_data_emits_no_library_warning(cli, tmp_path):
    write(tmp_path / "toy" / "toy.inter", HEADER + GOOD)
    write(tmp_path / "toy" / "toy.item", ITEMS)
    write(tmp_path / "log.csv", CSV)
    runs = [["--source", "recbole", "--input", tmp_path / "toy"],
            ["--source", "table", "--input", tmp_path / "log.csv", "split.mode=time"],
            ["--source", "table", "--input", tmp_path / "log.csv", "split.cold_item_fraction=0.3",
             "shards.samples=prefix"],
            ["--source", "synthetic", "synthetic.num_users=8", "synthetic.num_items=6", "synthetic.num_categories=2"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n, args in enumerate(runs):
            code, err = cli("prepare", *args, "--out", tmp_path / f"o{n}")
            assert code == 0, err
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
