"""SFT tokenization: truncation keeps the answer, untrainable records are reported/dropped."""
import logging
from pathlib import Path

import pytest

from core.data.tokenize import (
    encode_sft_record, encode_text_record, tokenize_dataset,
)
from core.errors import DataError
from core.templates import IGNORE_INDEX

TINY = Path(__file__).parent / "assets" / "tiny-tokenizer"
LONG = "The quick brown fox jumps over the lazy dog. " * 8


def conv(*pairs, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs, "tools": None}


def trained(tok, ex):
    ids = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    return tok.decode(ids)


def test_fits_untouched(tiny_tokenizer):
    ex = encode_sft_record(tiny_tokenizer, conv(("Hi", "Hello!"), system="Be kind."), "chatml",
                           cutoff_len=512)
    assert set(ex) == {"input_ids", "attention_mask", "labels"}
    n = len(ex["input_ids"])
    assert ex["attention_mask"] == [1] * n and len(ex["labels"]) == n
    assert trained(tiny_tokenizer, ex) == "Hello!<|im_end|>\n<eos>"


def test_oldest_turns_dropped_first_system_kept(tiny_tokenizer):
    rec = conv((LONG, "Paris."), ("Second question?", "Lisbon."), ("Third question?", "Brasília."),
               system="Be kind.")
    full = encode_sft_record(tiny_tokenizer, rec, "chatml", cutoff_len=512)
    ex = encode_sft_record(tiny_tokenizer, rec, "chatml", cutoff_len=len(full["input_ids"]) - 5)
    text = tiny_tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nSecond")
    assert "fox" not in text and len(ex["input_ids"]) <= len(full["input_ids"]) - 5
    assert trained(tiny_tokenizer, ex) == "Lisbon.<|im_end|>\nBrasília.<|im_end|>\n<eos>"


def test_prompt_cut_from_left_keeps_bos_and_answer(tiny_tokenizer):
    rec = conv((LONG + "What is the capital of France?", "Paris."))
    answer = tiny_tokenizer.encode("Paris.<end_of_turn>\n", add_special_tokens=False)
    cutoff = len(answer) + 1 + 10  # eos + 10 prompt tokens
    ex = encode_sft_record(tiny_tokenizer, rec, "gemma", cutoff_len=cutoff)
    assert len(ex["input_ids"]) == cutoff
    assert ex["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert trained(tiny_tokenizer, ex) == "Paris.<end_of_turn>\n<eos>"
    full = encode_sft_record(tiny_tokenizer, rec, "gemma", cutoff_len=512)["input_ids"]
    assert ex["input_ids"] == full[:1] + full[-(cutoff - 1):]  # bos + the prompt's tail


def test_answer_longer_than_cutoff_loses_its_end(tiny_tokenizer):
    ex = encode_sft_record(tiny_tokenizer, conv(("Tell a story.", LONG)), "gemma", cutoff_len=20)
    assert len(ex["input_ids"]) == 20 and ex["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert ex["labels"][0] == IGNORE_INDEX
    assert all(label != IGNORE_INDEX for label in ex["labels"][1:])
    assert LONG.startswith(trained(tiny_tokenizer, ex))


def test_mask_history_and_train_on_prompt(tiny_tokenizer):
    rec = conv(("Q1?", "A1."), ("Q2?", "A2."))
    ex = encode_sft_record(tiny_tokenizer, rec, "llama3", cutoff_len=512, mask_history=True)
    assert trained(tiny_tokenizer, ex) == "A2.<|eot_id|><eos>"
    ex = encode_sft_record(tiny_tokenizer, rec, "llama3", cutoff_len=512, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_untrainable_records_give_none(tiny_tokenizer):
    empty_answer = conv(("Hi", ""))
    assert encode_sft_record(tiny_tokenizer, empty_answer, None, cutoff_len=64,
                             add_eos_token=False) is None
    assert encode_sft_record(tiny_tokenizer, conv(("Hi", "Hello")), "gemma", cutoff_len=1) is None
    assert encode_text_record(tiny_tokenizer, "  ", cutoff_len=64) is None


def test_no_template_concatenates(tiny_tokenizer):
    ex = encode_sft_record(tiny_tokenizer, conv(("Hi. ", "Hello!")), None, cutoff_len=64)
    assert tiny_tokenizer.decode(ex["input_ids"]) == "Hi. Hello!<eos>"
    assert trained(tiny_tokenizer, ex) == "Hello!<eos>"


def test_text_record(tiny_tokenizer):
    ex = encode_text_record(tiny_tokenizer, "Hello world.", cutoff_len=64)
    assert ex["labels"] == ex["input_ids"]
    assert tiny_tokenizer.decode(ex["input_ids"]) == "Hello world.<eos>"
    ex = encode_text_record(tiny_tokenizer, LONG, cutoff_len=7)
    assert len(ex["input_ids"]) == 7 and ex["input_ids"][-1] != tiny_tokenizer.eos_token_id


def test_text_record_keeps_tokenizer_bos():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY, add_bos_token=True)
    ex = encode_text_record(tok, "Hello", cutoff_len=64)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"].count(tok.bos_token_id) == 1


def test_tokenize_dataset_drops_untrainable_with_count(tiny_tokenizer, caplog):
    records = [conv(("Hi", "Hello")), {"text": "Plain text."}, conv(("Hi", "")),
               conv(("Q1?", "A1."), ("Q2?", "A2."), system="S")]
    with caplog.at_level(logging.WARNING):
        ds = tokenize_dataset(tiny_tokenizer, records, "empty", cutoff_len=64, add_eos_token=False,
                              source="train.jsonl")
    assert len(ds) == 3 and set(ds.column_names) == {"input_ids", "attention_mask", "labels"}
    assert "train.jsonl: skipped 1 of 4" in caplog.text
    assert tiny_tokenizer.decode(ds[1]["input_ids"]) == "Plain text."
    with pytest.raises(DataError, match="train.jsonl.*none of the 1 records"):
        tokenize_dataset(tiny_tokenizer, [conv(("Hi", ""))], None, cutoff_len=64,
                         add_eos_token=False, source="train.jsonl")

