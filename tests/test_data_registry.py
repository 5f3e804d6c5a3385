"""dataset_info.json: validation, atomic save, kinds, and every demo dataset loading."""
import json

import pytest

from core import DATA_DIR
from core.data.loader import load_data
from core.data.registry import DatasetEntry, dataset_kind, load_dataset_info, save_dataset_info
from core.errors import DataError

DEMO_KINDS = {
    "identity": "sft", "identity_zh": "sft", "identity_pt": "sft", "demo_instruct": "sft",
    "demo_sharegpt": "sft", "demo_messages": "sft", "demo_pretrain": "text",
    "demo_preference": "preference", "demo_kto": "kto",
}


def info_dir(tmp_path, info, files=("a.json",)):
    for name in files:
        (tmp_path / name).write_text('[{"instruction": "q", "output": "a"}]')
    (tmp_path / "dataset_info.json").write_text(info if isinstance(info, str) else json.dumps(info))
    return tmp_path


def bad(tmp_path, info, **kw):
    with pytest.raises(DataError) as e:
        load_dataset_info(info_dir(tmp_path, info, **kw))
    assert "dataset_info.json" in str(e.value)
    return e.value


# --------------------------------------------------------------------------- the demos

def test_demo_registry_kinds():
    entries = load_dataset_info(DATA_DIR)
    assert {name: dataset_kind(e) for name, e in entries.items()} == DEMO_KINDS


@pytest.mark.parametrize("name", sorted(DEMO_KINDS))
def test_every_demo_dataset_loads(name):
    kind = DEMO_KINDS[name]
    train, _ = load_data(name, kind=kind, placeholders={"name": "Ada", "author": "Lab"})
    assert len(train) >= 10
    key = {"sft": "messages", "text": "text", "preference": "chosen", "kto": "label"}[kind]
    assert all(key in r for r in train)
    assert "{{" not in json.dumps(train, ensure_ascii=False)
    path = DATA_DIR / load_dataset_info(DATA_DIR)[name].file_name
    assert path.stat().st_size < 50_000


def test_demo_contents():
    pref, _ = load_data("demo_preference", kind="dpo")
    assert len(pref) >= 30 and all(r["chosen"] != r["rejected"] for r in pref)
    kto, _ = load_data("demo_kto", kind="kto")
    assert {r["label"] for r in kto} == {True, False}
    instruct, _ = load_data("demo_instruct")
    assert any(r["messages"][0]["role"] == "system" and len(r["messages"]) > 3 for r in instruct)
    identity, _ = load_data("identity")
    assert any("{{name}}" in m["content"] for r in identity for m in r["messages"])


# --------------------------------------------------------------------------- validation

def test_bad_json_names_line_and_column(tmp_path):
    e = bad(tmp_path, '{\n  "a": {"file_name": "a.json",}\n}')
    assert "line 2 column" in str(e)


def test_top_level_must_be_object(tmp_path):
    assert "top level is a list" in str(bad(tmp_path, "[]"))


def test_unknown_formatting(tmp_path):
    e = bad(tmp_path, {"a": {"file_name": "a.json", "formatting": "csv"}})
    assert e.field == "a.formatting" and "dataset 'a'" in str(e) and "'alpaca'" in str(e)


def test_unknown_keys(tmp_path):
    e = bad(tmp_path, {"a": {"file_name": "a.json", "hf_hub_url": "x/y"}})
    assert e.field == "a.hf_hub_url" and "only local files" in str(e)
    e = bad(tmp_path, {"a": {"file_name": "a.json", "columns": {"answer": "out"}}})
    assert e.field == "a.columns.answer" and "kto_tag" in str(e)
    e = bad(tmp_path, {"a": {"formatting": "alpaca"}})
    assert e.field == "a.file_name"


@pytest.mark.parametrize("file_name", ["../a.json", "/etc/passwd", "sub/../../a.json"])
def test_file_name_may_not_leave_data_dir(tmp_path, file_name):
    e = bad(tmp_path, {"a": {"file_name": file_name}})
    assert e.field == "a.file_name" and "leaves the data directory" in str(e)


def test_missing_file(tmp_path):
    e = bad(tmp_path, {"a": {"file_name": "gone.json"}})
    assert e.field == "a.file_name" and "does not exist" in str(e)
    assert load_dataset_info(tmp_path, check_files=False)["a"].file_name == "gone.json"
    with pytest.raises(DataError, match="does not exist"):
        load_data("a", data_dir=tmp_path)


def test_no_registry_is_empty(tmp_path):
    assert load_dataset_info(tmp_path) == {}


# --------------------------------------------------------------------------- saving and kinds

def test_save_roundtrip_is_atomic_and_validates(tmp_path):
    info_dir(tmp_path, {})
    entries = {"a": DatasetEntry(file_name="a.json"),
               "b": {"file_name": "a.json", "formatting": "sharegpt", "columns": {"messages": "chat"}}}
    save_dataset_info(tmp_path, entries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "dataset_info.json"]
    raw = json.loads((tmp_path / "dataset_info.json").read_text())
    assert raw == {"a": {"file_name": "a.json"},
                   "b": {"file_name": "a.json", "formatting": "sharegpt", "columns": {"messages": "chat"}}}
    loaded = load_dataset_info(tmp_path)
    assert loaded["b"].columns.messages == "chat"
    with pytest.raises(DataError, match="leaves the data directory"):
        save_dataset_info(tmp_path, {"c": {"file_name": "../x.json"}})
    with pytest.raises(DataError):
        save_dataset_info(tmp_path, {"c": {"file_name": "x.json", "ranking": "sometimes"}})
    assert json.loads((tmp_path / "dataset_info.json").read_text()) == raw  # untouched on error


@pytest.mark.parametrize("entry, kind", [
    ({}, "sft"),
    ({"formatting": "sharegpt"}, "sft"),
    ({"columns": {"prompt": "text"}}, "text"),
    ({"columns": {"text": "body"}}, "text"),
    ({"columns": {"prompt": "instruction", "response": "output"}}, "sft"),
    ({"ranking": True}, "preference"),
    ({"formatting": "sharegpt", "columns": {"kto_tag": "label"}}, "kto"),
])
def test_dataset_kind(entry, kind):
    assert dataset_kind(DatasetEntry(file_name="x.json", **entry)) == kind
