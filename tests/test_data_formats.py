"""Raw rows -> canonical records, and the DataError for each malformed row."""
import pytest

from core.data.formats import convert_row, detect_format, spec_for_detected
from core.errors import DataError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------- conversions

def test_alpaca_single_turn():
    row = {"instruction": "Translate", "input": "gato", "output": "cat"}
    assert convert_row(row) == {"messages": [U("Translate\ngato"), A("cat")], "tools": None}


def test_alpaca_system_history_and_empty_input():
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
           "history": [["1+1?", "2"], ["2+2?", "4"]]}
    assert convert_row(row) == {"messages": [S("Be brief."), U("1+1?"), A("2"), U("2+2?"), A("4"),
                                             U("And 3+3?"), A("6")], "tools": None}


def test_alpaca_custom_columns_and_tools():
    row = {"q": "Weather?", "a": "Sunny.", "tools": [{"name": "get_weather"}]}
    rec = convert_row(row, columns={"prompt": "q", "response": "a"})
    assert rec == {"messages": [U("Weather?"), A("Sunny.")], "tools": '[{"name": "get_weather"}]'}


def test_sharegpt_from_value_with_system_column():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
           "system": "Be kind."}
    assert convert_row(row, formatting="sharegpt") == {
        "messages": [S("Be kind."), U("Hi"), A("Hello")], "tools": None}


def test_sharegpt_role_content_and_custom_tags():
    row = {"conversations": [U("Hi"), A("Hello")]}
    assert convert_row(row, formatting="sharegpt")["messages"] == [U("Hi"), A("Hello")]
    row = {"chat": [{"speaker": "client", "text": "Hi"}, {"speaker": "bot", "text": "Yo"}]}
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "client", "assistant_tag": "bot"}
    rec = convert_row(row, formatting="sharegpt", columns={"messages": "chat"}, tags=tags)
    assert rec["messages"] == [U("Hi"), A("Yo")]


def test_openai_messages():
    row = {"messages": [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")]}
    assert convert_row(row, formatting="openai") == {"messages": row["messages"], "tools": None}


def test_text_and_sft_text_column():
    assert convert_row({"text": "A paragraph."}, kind="text", columns={"text": "text"}) == {"text": "A paragraph."}
    assert convert_row({"body": "Para."}, kind="text", columns={"prompt": "body"}) == {"text": "Para."}
    # sft with a text column: a string is plain text, a message list is a conversation
    assert convert_row({"text": "plain"}, columns={"text": "text"}) == {"text": "plain"}
    row = {"text": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    assert convert_row(row, columns={"text": "text"}) == {"messages": [U("Hi"), A("Hey")], "tools": None}


def test_preference_from_strings_and_lists():
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Math."}
    assert convert_row(row, kind="preference", columns=cols) == {
        "prompt": [S("Math."), U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}
    row = {"prompt": [U("hi"), A("hey"), U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}
    assert convert_row(row, kind="preference", columns=cols) == {
        "prompt": [U("hi"), A("hey"), U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}


def test_preference_sharegpt_ranking():
    row = {"conversations": [{"from": "human", "value": "2+2?"}],
           "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    assert convert_row(row, kind="preference", formatting="sharegpt") == {
        "prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}


def test_kto_alpaca_and_messages():
    row = {"prompt": "2+2?", "completion": "4", "label": "true"}
    assert convert_row(row, kind="kto", columns={"prompt": "prompt", "response": "completion",
                                                 "kto_tag": "label"}) == {
        "prompt": [U("2+2?")], "completion": [A("4")], "label": True}
    row = {"messages": [U("2+2?"), A("5")], "kto_tag": False}
    assert convert_row(row, kind="kto", formatting="openai") == {
        "prompt": [U("2+2?")], "completion": [A("5")], "label": False}


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ({"prompt": "p", "completion": "c", "label": True}, "kto"),
    ({"messages": [U("a"), A("b")]}, "openai"),
    ({"messages": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"text": "t"}, "text"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_unknown_and_spec():
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format({"foo": 1}, "x.jsonl", 4)
    spec = spec_for_detected("kto", {"prompt": "p", "completion": "c", "label": True})
    assert spec["columns"] == {"prompt": "prompt", "response": "completion", "kto_tag": "label"}


# --------------------------------------------------------------------------- malformed rows

MSGS = {"formatting": "openai"}
BAD = [
    # (row, spec, field in the error, words in the message)
    ({"instruction": "q"}, {}, "output", "missing"),
    ({"instruction": "q", "output": "  "}, {}, "output", "empty"),
    ({"instruction": "q", "output": 3}, {}, "output", "must be a string"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, {}, "history[0]", "pair"),
    ({"instruction": "q", "output": "a", "history": "x"}, {}, "history", "list"),
    ({"messages": []}, MSGS, "messages", "is empty"),
    ({"messages": "hi"}, MSGS, "messages", "non-empty list"),
    ({"messages": [U("q"), A("")]}, MSGS, "messages[1].content", "empty"),
    ({"messages": [A("a"), U("q")]}, MSGS, "messages[0].role", "out of order"),
    ({"messages": [U("q"), U("q"), A("a")]}, MSGS, "messages[1].role", "out of order"),
    ({"messages": [U("q"), S("s"), A("a")]}, MSGS, "messages[1].role", "only come first"),
    ({"messages": [U("q"), {"role": "bot", "content": "a"}]}, MSGS, "messages[1].role", "unknown role"),
    ({"messages": [{"from": "human", "value": "q"}, A("a")]}, MSGS, "messages[0].role", "no role"),
    ({"messages": [U("q"), A("a"), U("q2")]}, MSGS, "messages[2]", "pairs"),
    ({"messages": [S("s")]}, MSGS, "messages[0]", "pairs"),
    ({"messages": [U("q"), "hi"]}, MSGS, "messages[1]", "message is a str"),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"},
                        {"from": "observation", "value": "x"}]},
     {"formatting": "sharegpt"}, "conversations[2].from", "unknown role"),
    ({"messages": [S("s"), U("q"), A("a")], "system": "t"}, MSGS, "messages", "both"),
    ({"prompt": [U("q"), A("a")], "chosen": "c", "rejected": "r"},
     {"kind": "preference", "columns": {"prompt": "prompt"}}, "prompt[1]", "end with a user"),
    ({"prompt": "q", "chosen": [U("c")], "rejected": "r"},
     {"kind": "preference", "columns": {"prompt": "prompt"}}, "chosen.role", "assistant"),
    ({"prompt": "q", "chosen": "c"}, {"kind": "preference", "columns": {"prompt": "prompt"}},
     "rejected", "missing"),
    ({"messages": [U("q"), A("a")], "kto_tag": "maybe"}, {"kind": "kto", **MSGS}, "kto_tag", "boolean"),
    ({"text": ["not", "messages"]}, {"kind": "text", "columns": {"text": "text"}}, "text", "string"),
]


@pytest.mark.parametrize("row, spec, field, words", BAD)
def test_malformed_row_names_file_record_field(row, spec, field, words):
    with pytest.raises(DataError) as info:
        convert_row(row, file="chat.jsonl", record=7, **spec)
    err = info.value
    assert (err.file, err.record, err.field) == ("chat.jsonl", 7, field)
    assert f"chat.jsonl, record 7, field '{field}'" in str(err)
    assert words in str(err)


def test_openai_is_strict_about_role_names_sharegpt_is_not():
    row = {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}
    with pytest.raises(DataError, match="unknown role 'human'"):
        convert_row(row, formatting="openai")
    assert convert_row(row, formatting="sharegpt", columns={"messages": "messages"})["messages"] == [U("q"), A("a")]
