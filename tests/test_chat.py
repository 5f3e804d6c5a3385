"""Chat in a worker process on tiny local models: streaming equals in-process generate, a trained
run chats with its own template and stops at its end of turn, engines are independent, unload
ends the worker, and failures come back as errors instead of hangs."""
import json
import os
import signal
import time
from itertools import zip_longest

import psutil
import pytest
import torch

from core import LLMTrainingParams, Project
from core.chat import ChatEngine, clean_reply, prompt_ids
from core.errors import ModelNotFoundError, UserError

# short answers, many epochs: the tiny model learns to end every answer with <|im_end|>
QA = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
      ("Name a fruit.", "Apple."), ("What colour is the sky?", "Blue.")]
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat-run")
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": q, "input": "", "output": a}) for q, a in QA) + "\n")
    out = tmp / "run"
    params = LLMTrainingParams(
        model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer="sft", peft=True,
        chat_template="chatml", epochs=15, batch_size=2, gradient_accumulation=1, lr=3e-2, warmup_ratio=0.0,
        logging_steps=5, log="none", eval_strategy="no", save_strategy="no")
    assert Project(params, process=False).create() == 0
    return out


@pytest.fixture(scope="module")
def base_engine(tiny_model_dir):
    with ChatEngine() as engine:
        engine.load(str(tiny_model_dir))
        yield engine


@pytest.fixture(scope="module")
def run_engine(run_dir):
    with ChatEngine() as engine:
        engine.load(str(run_dir))
        yield engine


def test_stream_is_cumulative_and_equals_direct_generate(base_engine, tiny_model_dir):
    from core.model.loader import load_for_inference
    from core.templates import resolve_chat_template, stop_token_ids

    chunks = list(base_engine.stream(ASK, temperature=0, max_new_tokens=24))
    assert len(chunks) >= 2
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:])), chunks

    # the same greedy generation in this process
    model, tok = load_for_inference(str(tiny_model_dir))
    source = resolve_chat_template(None, tok, model.config.model_type)
    ids = torch.tensor([prompt_ids(tok, ASK, source)])
    stops = stop_token_ids(tok, source)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                         do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    expected = clean_reply(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                           base_engine.loaded()["stop_words"])
    assert chunks[-1] == expected
    stats = base_engine.last_stats
    assert stats["text"] == expected and stats["reason"] in ("stop", "length")
    assert stats["new_tokens"] == out.shape[1] - ids.shape[1]


def test_run_dir_chats_with_its_template_and_stops_at_end_of_turn(run_engine, run_dir):
    info = run_engine.loaded()
    assert info["template"] == "chatml" and "<|im_end|>" in info["stop_words"]
    assert info["adapter"] == str(run_dir) and info["device"] == "cpu" and info["dtype"] == "float32"
    reply = run_engine.reply(ASK, temperature=0, max_new_tokens=200)
    stats = run_engine.last_stats
    assert stats["reason"] == "stop", stats
    assert stats["new_tokens"] < 200 and "<|im_end|>" not in reply
    assert "Paris" in reply, reply


def test_two_engines_answer_side_by_side_independently(base_engine, run_engine):
    assert base_engine.loaded()["pid"] != run_engine.loaded()["pid"]
    pairs = list(zip_longest(base_engine.stream(ASK, temperature=0, max_new_tokens=16),
                             run_engine.stream(ASK, temperature=0, max_new_tokens=16)))
    base_reply = [a for a, _ in pairs if a is not None][-1]
    run_reply = [b for _, b in pairs if b is not None][-1]
    assert "Paris" in run_reply and base_reply != run_reply
    # and the engines still answer alone afterwards, the same way
    assert base_engine.reply(ASK, temperature=0, max_new_tokens=16) == base_reply


def test_sampling_with_seed_is_repeatable_and_early_close_cancels(base_engine):
    a = base_engine.reply(ASK, temperature=1.0, top_p=0.9, seed=3, max_new_tokens=12)
    assert base_engine.reply(ASK, temperature=1.0, top_p=0.9, seed=3, max_new_tokens=12) == a
    gen = base_engine.stream(ASK, temperature=0, max_new_tokens=400)
    next(gen)
    gen.close()  # the UI stopped reading: the worker cancels, the next request is not disturbed
    assert base_engine.reply(ASK, temperature=0, max_new_tokens=24) != ""


def test_bad_input_is_a_clear_error_not_a_hang(tmp_path):
    engine = ChatEngine(load_timeout=120)
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        engine.load(str(tmp_path / "no-such-model"))
    assert time.monotonic() - started < 60
    assert engine.loaded() is None
    with pytest.raises(UserError, match="No model is loaded"):
        next(engine.stream(ASK))


def test_load_replaces_unload_ends_worker_and_a_dead_worker_is_reported(tiny_model_dir):
    engine = ChatEngine()
    first = engine.load(str(tiny_model_dir))["pid"]
    second = engine.load(str(tiny_model_dir), chat_template="chatml")
    assert second["template"] == "chatml" and second["pid"] != first
    assert not psutil.pid_exists(first)  # loading a second model ended the first worker
    os.kill(second["pid"], signal.SIGKILL)  # e.g. the OOM killer
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="worker stopped"):
        engine.reply(ASK, max_new_tokens=8)
    assert time.monotonic() - started < 10
    assert engine.loaded() is None

    third = engine.load(str(tiny_model_dir))
    report = engine.unload()
    assert report["pid"] == third["pid"] and report["released_mb"] > 0
    assert not psutil.pid_exists(third["pid"])
    assert engine.loaded() is None and engine.unload() is None


def test_messages_from_gradio_and_stop_word_cleanup():
    from core.chat import _normalize

    msgs = _normalize([{"role": "system", "content": "old"}, ["hi", "hello"],
                       {"role": "user", "content": [{"type": "text", "text": "how"}, {"path": "a.png"}],
                        "metadata": None}], system="be brief")
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how"}]
    with pytest.raises(UserError, match="end with a user message"):
        _normalize([["hi", "hello"]], None)
    assert clean_reply("Paris.<|im_end|>\nmore", ["<|im_end|>"]) == "Paris."
    assert clean_reply("Paris.<|im_", ["<|im_end|>"], final=False) == "Paris."
    assert clean_reply("a < b", ["<|im_end|>"], final=False) == "a < b"
