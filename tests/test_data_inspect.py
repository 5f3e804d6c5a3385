"""Dataset tab logic: every bad record reported, pages previewed with trained tokens marked,
uploads kept inside the data directory, entries registered."""
import json
import shutil

import pytest

from core import DATA_DIR
from core.data.inspect import (
    add_entry, preview, render_segments_html, upload_file, validate_entry, validate_file,
)
from core.data.loader import load_data
from core.data.registry import load_dataset_info
from core.errors import DataError


def alpaca(i):
    return {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "qa.jsonl", [alpaca(i) for i in range(12)])
    (d / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "qa.jsonl"}}))
    return d


# --------------------------------------------------------------------------- validation

def test_every_bad_record_reported_with_its_field(tmp_path):
    rows = [alpaca(i) for i in range(10)]
    rows[2]["output"] = ""                        # record 3: empty answer
    del rows[5]["instruction"]                    # record 6: missing column
    rows[8]["history"] = [["only a question"]]    # record 9: malformed history pair
    errors = validate_file(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(e["record"], e["field"]) for e in errors] == [
        (3, "output"), (6, "instruction"), (9, "history[0]")]
    assert all("d.jsonl" in e["message"] and e["file"].endswith("d.jsonl") for e in errors)
    assert errors[1]["fix"]  # the missing-column error says how to map columns
    assert len(validate_file(tmp_path / "d.jsonl", max_errors=2)) == 2


def test_first_row_unreadable_still_detects_from_the_others(tmp_path):
    rows = [{"question": "?"}] + [{"messages": [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}]}] * 3
    errors = validate_file(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [(e["record"], e["field"]) for e in errors] == [(1, "messages")]


def test_explicit_formatting_and_columns(tmp_path):
    rows = [{"q": "Hi", "a": "Hello"}, {"q": "Hi", "a": 3}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    errors = validate_file(path, formatting="alpaca", columns={"prompt": "q", "response": "a"})
    assert [(e["record"], e["field"]) for e in errors] == [(2, "a")]
    # without a formatting the columns act as --column-mapping, as in training
    assert validate_file(path, columns={"prompt": "q", "response": "a"}) == errors


@pytest.mark.parametrize("name, content, words", [
    ("bad.json", '[{"a": 1},', "invalid JSON"),
    ("empty.jsonl", "\n\n", "empty"),
    ("latin.jsonl", b'{"text": "caf\xe9"}\n', "UTF-8"),
    ("odd.jsonl", '{"question": "?"}\n', "cannot tell the format"),
    ("notes.txt", "hello", "unsupported file type"),
])
def test_file_level_errors_come_as_one(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    errors = validate_file(path)
    assert len(errors) == 1 and errors[0]["record"] in (None, 1)
    assert words in errors[0]["message"]
    if name != "latin.jsonl":  # JSONL decode errors name their line
        assert errors[0]["record"] is None


def test_validation_agrees_with_the_loader(tmp_path):
    rows = [alpaca(i) for i in range(4)]
    rows[1]["output"] = ["not", "text"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    (err,) = validate_file(path)
    with pytest.raises(DataError) as caught:
        load_data(str(path), data_dir=tmp_path)
    assert str(caught.value) == err["message"]


@pytest.mark.parametrize("name", sorted(json.loads((DATA_DIR / "dataset_info.json").read_text())))
def test_demo_datasets_are_clean(name):
    assert validate_entry(DATA_DIR, name) == []


def test_validate_entry_uses_its_columns_and_reports_unknown_names(data_dir):
    write_jsonl(data_dir / "pairs.jsonl", [{"q": "Hi", "good": "Hello", "bad": "Go away"},
                                           {"q": "Hi", "good": "Hello"}])
    add_entry(data_dir, "pairs", file_name="pairs.jsonl", formatting="alpaca", ranking=True,
              columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [(e["record"], e["field"]) for e in validate_entry(data_dir, "pairs")] == [(2, "bad")]
    (err,) = validate_entry(data_dir, "nope")
    assert err["record"] is None and "qa" in err["message"]


# --------------------------------------------------------------------------- preview

def test_preview_pages_and_counts(data_dir):
    first = preview("qa", data_dir=data_dir, page_size=5)
    assert (first["total"], first["pages"], first["kind"]) == (12, 3, "sft")
    assert [r["record"] for r in first["records"]] == [1, 2, 3, 4, 5]
    assert first["records"][0]["data"]["messages"][-1] == {"role": "assistant",
                                                           "content": "Answer 0."}
    last = preview(str(data_dir / "qa.jsonl"), data_dir=data_dir, page=2, page_size=5)
    assert [r["index"] for r in last["records"]] == [10, 11]
    assert preview("qa", data_dir=data_dir, page=99, page_size=5)["page"] == 2  # clamped


def test_preview_shows_bad_records_inline(tmp_path):
    rows = [alpaca(0), {**alpaca(1), "output": ""}]
    page = preview(str(write_jsonl(tmp_path / "d.jsonl", rows)), data_dir=tmp_path)
    good, bad = page["records"]
    assert good["error"] is None and bad["data"] is None
    assert (bad["error"]["record"], bad["error"]["field"]) == (2, "output")


def trained_text(segments):
    return "".join(t for t, trained in segments if trained)


def test_segments_mark_exactly_the_answer(data_dir, tiny_tokenizer):
    page = preview("qa", data_dir=data_dir, page_size=1, tokenizer=tiny_tokenizer,
                   chat_template="chatml")
    rec = page["records"][0]
    # the answer, chatml's end of turn, and the eos that tokenization appends
    assert trained_text(rec["segments"]) == "Answer 0.<|im_end|>\n<eos>"
    assert "".join(t for t, _ in rec["segments"]) == (
        "<|im_start|>user\nQuestion 0?<|im_end|>\n<|im_start|>assistant\n"
        "Answer 0.<|im_end|>\n<eos>")
    assert rec["num_trained"] == len(tiny_tokenizer.encode(
        "Answer 0.<|im_end|>\n<eos>", add_special_tokens=False))
    assert rec["num_tokens"] > rec["num_trained"]
    assert '<mark class="trained">Answer 0.&lt;|im_end|&gt;\n&lt;eos&gt;</mark>' in rec["html"]

    every = preview("qa", data_dir=data_dir, page_size=1, tokenizer=tiny_tokenizer,
                    chat_template="chatml", train_on_prompt=True)["records"][0]
    assert len(every["segments"]) == 1 and every["segments"][0][1] is True
    assert every["num_trained"] == every["num_tokens"]


def test_preview_of_preference_and_text_data(tiny_tokenizer):
    rec = preview("demo_preference", data_dir=DATA_DIR, kind="dpo", page_size=1,
                  tokenizer=tiny_tokenizer, chat_template="chatml")["records"][0]
    assert trained_text(rec["segments"]).startswith(rec["data"]["chosen"][0]["content"])
    assert trained_text(rec["rejected"]["segments"]).startswith(
        rec["data"]["rejected"][0]["content"])
    text = preview("demo_pretrain", data_dir=DATA_DIR, kind=None, page_size=1,
                   tokenizer=tiny_tokenizer)
    assert text["kind"] == "text" and text["records"][0]["num_trained"] > 0
    with pytest.raises(DataError, match="preference data"):
        preview("demo_preference", data_dir=DATA_DIR, kind="sft")


def test_html_is_escaped():
    out = render_segments_html([("<script>alert(1)</script>", False), ("a & b", True)])
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert '<mark class="trained">a &amp; b</mark>' in out


# --------------------------------------------------------------------------- upload + register

def test_upload_stays_inside_data_dir(data_dir, tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [alpaca(1)])
    dest = upload_file(data_dir, src)
    assert dest == data_dir / "chat.jsonl" and dest.read_bytes() == src.read_bytes()
    assert upload_file(data_dir, src) == dest  # the same file again is fine
    for bad in ("../x.json", "sub/x.json", "..", ".hidden.json", "dataset_info.json", "x.exe"):
        with pytest.raises(DataError):
            upload_file(data_dir, src, name=bad)
    assert not (tmp_path / "x.json").exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["chat.jsonl", "dataset_info.json",
                                                          "qa.jsonl"]


def test_upload_refuses_oversize_and_different_files(data_dir, tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl", [alpaca(i) for i in range(50)])
    with pytest.raises(DataError, match="upload limit"):
        upload_file(data_dir, src, max_bytes=100)
    assert not (data_dir / "big.jsonl").exists()
    other = write_jsonl(tmp_path / "other.jsonl", [alpaca(7)])
    with pytest.raises(DataError, match="already exists"):
        upload_file(data_dir, other, name="qa.jsonl")
    assert upload_file(data_dir, other, name="qa.jsonl", overwrite=True).read_bytes() == \
        other.read_bytes()
    assert not list(data_dir.glob(".upload.*"))  # no temp files left behind


def test_add_entry_then_registry_and_loader_see_it(data_dir, tmp_path):
    shutil.copy(DATA_DIR / "demo_messages.jsonl", data_dir / "chat.jsonl")
    add_entry(data_dir, "chat", file_name="chat.jsonl", formatting="openai")
    entry = load_dataset_info(data_dir)["chat"]
    assert (entry.file_name, entry.formatting) == ("chat.jsonl", "openai")
    assert "qa" in load_dataset_info(data_dir)  # the others are kept
    train, _ = load_data("chat", data_dir=data_dir)
    assert train and validate_entry(data_dir, "chat") == []
    with pytest.raises(DataError, match="already exists"):
        add_entry(data_dir, "chat", file_name="chat.jsonl", formatting="openai")
    with pytest.raises(DataError, match="does not exist"):
        add_entry(data_dir, "ghost", file_name="ghost.jsonl", formatting="alpaca")
    with pytest.raises(DataError, match="leaves the data directory"):
        add_entry(data_dir, "out", file_name="../x.jsonl", formatting="alpaca")
    with pytest.raises(DataError):
        add_entry(data_dir, "bad", file_name="chat.jsonl", formatting="openai",
                  columns={"nonsense": "x"})
    assert set(load_dataset_info(data_dir)) == {"qa", "chat"}
