"""Each source format read into the same dataset, checked exactly on small known files."""

import json

import pandas as pd
import pytest

from tests.conftest import write

RECBOLE_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
u1\ta\t5\t3
u1\tb\t4\t1
u1\tc\t3\t2
u1\td\t5\t2
u2\ta\t2\t1
u2\tb\t5\t2
u2\tc\t5\t3
"""
RECBOLE_ITEM = """item_id:token\ttitle:token\tcategories:token_seq\tbrand:token
a\tAlpha Cream\t"'Beauty', ""Women's"", 'Skin'"\tAcme
b\t"Beta
Lotion"\t'Beauty'\tBco
c\t\t'Hair'\tCco
d\tDelta\tBeauty Hair\t
e\tEpsilon\t'Unused'\tEco
"""


def test_recbole_split_text_and_order(prepare, tmp_path):
    write(tmp_path / "toy" / "toy.inter", RECBOLE_INTER)
    write(tmp_path / "toy" / "toy.item", RECBOLE_ITEM)
    data = prepare("recbole", tmp_path / "toy")
    m = data.manifest
    assert (m["num_users"], m["num_items"], m["num_interactions"], m["rows_read"]) == (2, 4, 7, 7)
    assert m["catalog"]["rows_read"] == 5 and m["notes"]["items_without_title"] == 1
    # items indexed by first appearance in time order (ties keep file order): b, a, c, d
    assert list(data.items["item_id"]) == ["b", "a", "c", "d"]
    text = dict(zip(data.items["item_id"], data.items["text"]))
    assert text["a"] == "Alpha Cream. Brand: Acme. Categories: Beauty, Women's, Skin"
    assert text["b"] == "Beta Lotion. Brand: Bco. Categories: Beauty"
    assert text["c"] == "Brand: Cco. Categories: Hair"  # no title: falls back to the other fields
    assert list(data.items.set_index("item_id")["categories"]["d"]) == ["Beauty", "Hair"]
    # u1 in time order: b(1) c(2) d(2, after c in the file) a(3)
    test, val = data.user_row(data.test, "u1"), data.user_row(data.val, "u1")
    assert data.item_ids(test["history"]) == ["b", "c", "d"] and data.item_ids([test["target"]]) == ["a"]
    assert data.item_ids(val["history"]) == ["b", "c"] and data.item_ids([val["target"]]) == ["d"]
    # training popularity counts only the training part: u1 b,c and u2 a
    assert dict(zip(data.items["item_id"], data.items["train_count"])) == {"b": 1, "a": 1, "c": 1, "d": 0}
    assert m["sources"][0]["path"].endswith("toy.inter") and len(m["sources"][0]["sha256"]) == 64


def test_recbole_keep_unseen_items(prepare, tmp_path):
    write(tmp_path / "toy" / "toy.inter", RECBOLE_INTER)
    write(tmp_path / "toy" / "toy.item", RECBOLE_ITEM)
    data = prepare("recbole", tmp_path / "toy", "filter.keep_unseen_items=true")
    assert list(data.items["item_id"]) == ["b", "a", "c", "d", "e"]
    assert data.items["train_count"].iloc[-1] == 0


def test_movielens_dat_layout_latin1(prepare, tmp_path):
    folder = tmp_path / "ml"
    write(folder / "ratings.dat", "1::10::5::100\n1::20::3::50\n1::30::4::70\n2::10::1::10\n")
    write(folder / "movies.dat", "10::Misérables, Les (1995)::Drama|Musical\n20::Heat (1995)::Action\n"
          "30::Babe (1995)::Children's|Comedy\n".encode("latin-1"))
    data = prepare("movielens", folder)
    assert data.manifest["num_interactions"] == 4
    row = data.items.set_index("item_id").loc["10"]
    assert row["title"] == "Misérables, Les (1995)" and list(row["categories"]) == ["Drama", "Musical"]
    test = data.user_row(data.test, "1")
    assert data.item_ids(test["history"]) == ["20", "30"] and data.item_ids([test["target"]]) == ["10"]


def test_movielens_100k_layout(prepare, tmp_path):
    folder = tmp_path / "ml-100k"
    write(folder / "u.data", "7\t1\t4\t300\n7\t2\t5\t100\n7\t3\t3\t200\n")
    flags = ["0"] * 19
    action = flags.copy(); action[1] = "1"; action[5] = "1"
    write(folder / "u.item", "\n".join([
        "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(action),
        "2|GoldenEye (1995)|01-Jan-1995||http://y|" + "|".join(flags),
        "3|Four Rooms (1995)|01-Jan-1995||http://z|" + "|".join(flags)]) + "\n")
    data = prepare("movielens", folder)
    assert list(data.items.set_index("item_id")["categories"]["1"]) == ["Action", "Comedy"]
    test = data.user_row(data.test, "7")
    assert data.item_ids(test["history"]) == ["2", "3"] and data.item_ids([test["target"]]) == ["1"]


def test_p5_sequences_map_to_original_ids(prepare, tmp_path):
    folder = tmp_path / "beauty"
    write(folder / "sequential_data.txt", "1 1 2 3\n2 2 3 1 4\n")
    write(folder / "datamaps.json", json.dumps({
        "user2id": {"RA": "1", "RB": "2"},
        "item2id": {"A1": "1", "A2": "2", "A3": "3", "A4": "4"}}))
    write(folder / "x.item", "item_id:token\ttitle:token\tcategories:token_seq\n"
          "A1\tOne\t'Beauty', 'Nails'\nA2\tTwo\t'Beauty'\nA3\tThree\t'Hair'\nA4\tFour\t'Hair'\n")
    data = prepare("p5", folder)
    assert data.manifest["ordered_by"] == "file order"
    assert list(data.items["item_id"]) == ["A1", "A2", "A3", "A4"]  # P5 indices are first-appearance order
    test = data.user_row(data.test, "RB")
    assert data.item_ids(test["history"]) == ["A2", "A3", "A1"] and data.item_ids([test["target"]]) == ["A4"]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_table_formats_with_events_and_iso_times(prepare, tmp_path, fmt):
    rows = pd.DataFrame({
        "uid": ["x", "x", "x", "x", "y"],
        "pid": [1, 2, 3, 4, 1],
        "kind": ["buy", "view", "buy", "buy", "buy"],
        "when": ["2024-01-03T00:00:00Z", "2024-01-01", "2024-01-01T12:00:00", "2024-01-02", "2024-01-05"],
    })
    path = tmp_path / f"events.{fmt}"
    if fmt == "csv":
        rows.to_csv(path, index=False)
    elif fmt == "parquet":
        rows.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows.to_dict("records")) + "\n")
    catalog = pd.DataFrame({"pid": [1, 2, 3, 4], "name": ["P1", "P2", "P3", "P4"],
                            "cats": ["a/b", "a", "c", "c/d"], "brand": ["B1", "B2", "B3", "B4"]})
    catalog.to_parquet(tmp_path / "catalog.parquet")
    data = prepare("table", path, "columns.user=uid", "columns.item=pid", "columns.timestamp=when",
                   "columns.event=kind", "columns.item_id=pid", "columns.title=name", "columns.categories=cats",
                   "columns.category_separator=/", "columns.text=[brand]", "filter.events=[buy]",
                   items=tmp_path / "catalog.parquet")
    assert data.manifest["steps"]["after_event_filter"] == 4
    test = data.user_row(data.test, "x")
    # buys of x in time order: 3 (Jan 1 12:00), 4 (Jan 2), 1 (Jan 3)
    assert data.item_ids(test["history"]) == ["3", "4"] and data.item_ids([test["target"]]) == ["1"]
    assert data.items.set_index("item_id")["text"]["4"] == "P4. Brand: B4. Categories: c, d"
