"""The one check every stage makes before it writes or replaces a directory."""

import json

import pytest

from distrec.config import ConfigError
from distrec.outputs import (MARKER, check_output, fingerprint_dir, fingerprint_file, mark_output, read_marker,
                             written_by)


def test_absent_or_empty_output_is_free(tmp_path):
    assert check_output(tmp_path / "new", "prepare") is False
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "prepare") is False


@pytest.mark.parametrize("overwrite", [False, True, None])
def test_an_input_or_a_folder_holding_one_is_never_replaced(tmp_path, overwrite):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "events.csv").write_text("u,i\n")
    for out in (raw, tmp_path):  # the input folder itself, and its parent
        with pytest.raises(ConfigError, match="never") as e:
            check_output(out, "prepare", inputs=[raw / "events.csv"], overwrite=overwrite)
        assert "--overwrite" not in str(e.value)  # the flag would not help: do not suggest it
    with pytest.raises(ConfigError, match="is the input"):
        check_output(raw, "train", inputs=[raw], overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True, None])
def test_a_folder_distrec_did_not_write_is_never_replaced(tmp_path, overwrite):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not written by distrec.*thesis.tex") as e:
        check_output(tmp_path / "mine", "evaluate", overwrite=overwrite)
    assert "--overwrite" not in str(e.value)


def test_another_stages_output_is_not_replaced(tmp_path):
    (tmp_path / "run").mkdir()
    mark_output(tmp_path / "run", "train")
    with pytest.raises(ConfigError, match="written by distrec train"):
        check_output(tmp_path / "run", "prepare", overwrite=True)


def test_own_output_needs_the_flag_and_then_may_be_replaced(tmp_path):
    out = tmp_path / "recs"
    out.mkdir()
    mark_output(out, "score", {"data": "d"})
    with pytest.raises(ConfigError, match="pass --overwrite"):
        check_output(out, "score")
    with pytest.raises(ConfigError, match="pass run.overwrite=true"):
        check_output(out, "score", flag="run.overwrite=true")
    assert check_output(out, "score", overwrite=True) is True
    assert check_output(out, "score", overwrite=None) is True
    assert read_marker(out)["inputs"] == {"data": "d"} and read_marker(out)["stage"] == "score"


def test_outputs_from_before_the_marker_are_recognised(tmp_path):
    prepared = tmp_path / "data"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({"format": "distrec-prepared/1"}))
    assert written_by(prepared) == "prepare" and not (prepared / MARKER).exists()
    assert check_output(prepared, "prepare", overwrite=True) is True
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    assert written_by(tmp_path / "fake") is None


def test_the_current_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="current directory"):
        check_output(".", "prepare", overwrite=True)
    with pytest.raises(ConfigError, match="current directory"):
        check_output("..", "prepare", overwrite=True)


def test_a_file_in_place_of_the_output_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        check_output(tmp_path / "out", "score", overwrite=True)


def test_fingerprints_follow_the_content(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"1")
    (d / "sub" / "b.bin").write_bytes(b"2")
    first = fingerprint_dir(d)
    (d / ".hidden").write_text("ignored")
    assert fingerprint_dir(d) == first
    (d / "sub" / "b.bin").write_bytes(b"3")
    assert fingerprint_dir(d) != first
    assert fingerprint_file(d / "a.bin") == "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"  # sha256("1")
    assert fingerprint_dir(d, ["a.bin"]) != fingerprint_dir(d)
