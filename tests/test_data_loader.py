"""load_data: files, directories, registered names, splits, caps, placeholders and bad files."""
import json

import pandas as pd
import pytest

from core.data.loader import kind_for_trainer, load_data, read_rows, split_eval
from core.errors import ConfigError, DataError

ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
TEXT = [{"text": f"paragraph {i}"} for i in range(10)]


def chat(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "tools": None}


def write(path, rows):
    """Write rows in the format the suffix names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def empty_registry(tmp_path):
    d = tmp_path / "registry"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- resolution

@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_single_file_and_directory(tmp_path, ext, empty_registry):
    f = write(tmp_path / f"train{ext}", TEXT)
    train, evals = load_data(str(f), data_dir=empty_registry)
    assert train == TEXT and evals is None
    train, _ = load_data(str(tmp_path), data_dir=empty_registry)
    assert train == TEXT


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_directory_with_valid_split(tmp_path, ext, empty_registry):
    write(tmp_path / f"train{ext}", TEXT[:8])
    write(tmp_path / f"validation{ext}", TEXT[8:])
    train, evals = load_data(tmp_path, valid_split="validation", data_dir=empty_registry)
    assert train == TEXT[:8] and evals == TEXT[8:]


def test_valid_split_as_file_and_custom_train_split(tmp_path, empty_registry):
    write(tmp_path / "mytrain.jsonl", TEXT[:5])
    (tmp_path / "other").mkdir()
    val = write(tmp_path / "other" / "v.json", TEXT[5:])
    train, evals = load_data(tmp_path, split="mytrain", valid_split=str(val), data_dir=empty_registry)
    assert len(train) == 5 and evals == TEXT[5:]


def test_directory_with_parquet_shards(tmp_path, empty_registry):
    write(tmp_path / "train-00000-of-00002.parquet", TEXT[:4])
    write(tmp_path / "train-00001-of-00002.parquet", TEXT[4:])
    assert load_data(tmp_path, data_dir=empty_registry)[0] == TEXT


def test_directory_without_split_file(tmp_path, empty_registry):
    write(tmp_path / "data.jsonl", TEXT)
    with pytest.raises(DataError, match=r"no 'train' file.*data\.jsonl.*Fix: name the file train\.jsonl"):
        load_data(tmp_path, data_dir=empty_registry)
    write(tmp_path / "train.jsonl", TEXT)
    with pytest.raises(DataError, match="no 'dev' file"):
        load_data(tmp_path, valid_split="dev", data_dir=empty_registry)


def test_registered_names_and_comma_list(tmp_path):
    write(tmp_path / "a.json", ROWS[:3])
    write(tmp_path / "b.jsonl", ROWS[3:5])
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl"}}))
    train, _ = load_data("a, b", data_dir=tmp_path)
    assert train == [chat(i) for i in range(5)]
    train, evals = load_data("a", valid_split="b", data_dir=tmp_path)
    assert len(train) == 3 and len(evals) == 2


def test_unregistered_name_lists_registered_ones(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpha": {"file_name": "a.json"}}))
    with pytest.raises(DataError) as info:
        load_data("nope", data_dir=tmp_path)
    assert "nope" in str(info.value) and "alpha" in str(info.value) and "Fix:" in str(info.value)


def test_registered_kind_must_fit_the_trainer(tmp_path):
    write(tmp_path / "a.json", ROWS)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))
    with pytest.raises(DataError, match="holds sft data, but this trainer needs preference"):
        load_data("a", kind="dpo", data_dir=tmp_path)


def test_trainer_names_map_to_kinds():
    assert [kind_for_trainer(t) for t in ("pt", "default", "dpo", "orpo", "reward", "kto")] == [
        "text", "sft", "preference", "preference", "preference", "kto"]
    with pytest.raises(ConfigError):
        load_data("x", kind="nonsense")


# --------------------------------------------------------------------------- splits and caps

def test_val_size_is_deterministic_and_disjoint(tmp_path, empty_registry):
    f = write(tmp_path / "t.jsonl", TEXT)
    tr1, ev1 = load_data(f, val_size=0.2, data_dir=empty_registry)
    tr2, ev2 = load_data(f, val_size=0.2, data_dir=empty_registry)
    assert (tr1, ev1) == (tr2, ev2) and len(ev1) == 2 and len(tr1) == 8
    assert sorted(r["text"] for r in tr1 + ev1) == sorted(r["text"] for r in TEXT)
    _, ev3 = load_data(f, val_size=3, data_dir=empty_registry)
    assert len(ev3) == 3
    assert split_eval(TEXT, 0.2, seed=1)[1] != ev1 or split_eval(TEXT, 0.2, seed=2)[1] != ev1
    for bad in (1.5, 10, -0.1):
        with pytest.raises(ConfigError):
            split_eval(TEXT, bad)
    with pytest.raises(ConfigError, match="not both"):
        load_data(f, valid_split="v", val_size=0.1, data_dir=empty_registry)


def test_max_samples_caps_each_dataset(tmp_path):
    write(tmp_path / "a.jsonl", TEXT)
    write(tmp_path / "b.jsonl", TEXT)
    train, _ = load_data(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}", max_samples=3, data_dir=tmp_path)
    assert train == TEXT[:3] + TEXT[:3]


def test_max_samples_skips_checking_rows_past_the_cap(tmp_path, empty_registry):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "ok"}\n{"text": ""}\n')
    assert load_data(f, max_samples=1, data_dir=empty_registry)[0] == [{"text": "ok"}]


def test_placeholders_filled(tmp_path, empty_registry):
    f = write(tmp_path / "id.json", [{"instruction": "Who are you?", "output": "I am {{name}} by {{ author }}."}])
    train, _ = load_data(f, auto_convert=True, placeholders={"name": "Ada", "author": "Lab"},
                         data_dir=empty_registry)
    assert train[0]["messages"][1]["content"] == "I am Ada by Lab."


# --------------------------------------------------------------------------- column choice

def test_auto_convert_detects_formats(tmp_path, empty_registry):
    sg = write(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                           {"from": "gpt", "value": "a"}]}])
    # no `text` column and no column flags: the shape is detected without the flag
    assert load_data(sg, data_dir=empty_registry)[0] == load_data(sg, auto_convert=True, data_dir=empty_registry)[0]
    # an explicit --text-column that is missing stays an error naming the column
    with pytest.raises(DataError, match="column 'body' is missing"):
        load_data(sg, text_column="body", data_dir=empty_registry)
    assert load_data(sg, auto_convert=True, data_dir=empty_registry)[0] == [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": None}]
    al = write(tmp_path / "al.csv", ROWS[:2])
    assert load_data(al, auto_convert=True, data_dir=empty_registry)[0] == [chat(0), chat(1)]
    pref = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert load_data(pref, kind="dpo", auto_convert=True, data_dir=empty_registry)[0][0]["chosen"] == [
        {"role": "assistant", "content": "good"}]


def test_messages_file_needs_no_flags(tmp_path, empty_registry):
    f = write(tmp_path / "m.jsonl", [chat(0)])
    assert load_data(f, data_dir=empty_registry)[0] == [chat(0)]


def test_dpo_seed_flags_and_column_mapping(tmp_path, empty_registry):
    f = write(tmp_path / "p.jsonl", [{"question": "2+2?", "good": "4", "bad": "5"}])
    want = [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    got = load_data(f, kind="dpo", prompt_text_column="question", text_column="good",
                    rejected_text_column="bad", data_dir=empty_registry)[0]
    assert got == want
    mapping = {"prompt_text_column": "question", "text_column": "good", "rejected_text_column": "bad"}
    assert load_data(f, kind="orpo", column_mapping=mapping, data_dir=empty_registry)[0] == want
    lf = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert load_data(f, kind="dpo", column_mapping=lf, data_dir=empty_registry)[0] == want
    with pytest.raises(ConfigError, match="column_mapping key"):
        load_data(f, column_mapping={"colour": "x"}, data_dir=empty_registry)


def test_text_column_for_pt_and_conversation_csv(tmp_path, empty_registry):
    f = write(tmp_path / "t.csv", [{"body": "hello world"}])
    assert load_data(f, kind="pt", text_column="body", data_dir=empty_registry)[0] == [{"text": "hello world"}]
    conv = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    f = write(tmp_path / "c.csv", [{"text": conv}])
    assert load_data(f, data_dir=empty_registry)[0][0]["messages"][1] == {"role": "assistant", "content": "a"}


def test_kto_file(tmp_path, empty_registry):
    f = write(tmp_path / "k.csv", [{"prompt": "q", "completion": "a", "label": "false"}])
    assert load_data(f, kind="kto", data_dir=empty_registry)[0] == [
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}],
         "label": False}]


# --------------------------------------------------------------------------- bad files

def err(path, **kw):
    with pytest.raises(DataError) as info:
        load_data(str(path), data_dir=path.parent, **kw)
    return info.value


def test_bad_jsonl_line_names_its_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    e = err(f)
    assert e.record == 3 and str(f) in str(e) and "record 3" in str(e) and "invalid JSON" in str(e)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a"}\n[1, 2]\n')
    assert err(f).record == 2


def test_record_numbers_in_conversion_errors(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": ""}\n')
    e = err(f)
    assert (e.record, e.field) == (4, "text") and f"{f}, record 4, field 'text'" in str(e)
    e = err(write(tmp_path / "t.json", TEXT[:2] + [{"txt": "x"}]))
    assert (e.record, e.field) == (3, "text")
    e = err(write(tmp_path / "t.csv", [{"text": "a"}, {"text": ""}]))
    assert (e.record, e.field) == (2, "text")
    e = err(write(tmp_path / "t.parquet", [{"text": "a"}, {"text": "b"}, {"text": " "}]))
    assert (e.record, e.field) == (3, "text")


def test_wrong_top_level_json(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"data": [{"text": "a"}]}')
    assert "top level is a JSON dict" in str(err(f))
    f.write_text('[{"text": "a"}, "b"]')
    assert err(f).record == 2
    f.write_text('[{"text": "a"},\n {"text": }]')
    assert "line 2 column" in str(err(f))


def test_jsonl_saved_as_json_is_read(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_data(f, data_dir=tmp_path)[0] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", "  \n"), ("e.csv", ""),
                                           ("e.json", "[]"), ("e.jsonl", "\n\n")])
def test_empty_files(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    assert "empty" in str(err(f)) or "no records" in str(err(f))


def test_non_utf8_file(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    e = err(f)
    assert e.record == 2 and "UTF-8" in str(e)
    f = tmp_path / "t.csv"
    f.write_bytes(b"text\ncaf\xe9\n")
    assert "UTF-8" in str(err(f))


def test_broken_csv_and_parquet(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text('text\n"a"\n"b","c","d"\n')
    assert "malformed CSV" in str(err(f))
    p = tmp_path / "t.parquet"
    p.write_bytes(b"not parquet at all")
    assert "cannot read parquet" in str(err(p))
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(tmp_path / "x.txt")
