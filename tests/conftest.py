"""Shared fixtures: a tiny random Llama built locally from a committed tokenizer (no network)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny-tokenizer"
REPO = Path(__file__).resolve().parent.parent


def build_tiny_model(out_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a random 2-layer Llama (hidden 64) with the tiny tokenizer to out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        # wider than the 0.02 default so logits can move far even when only adapters train
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama directory, built once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


# A tiny instruction set the end-to-end tests train on.
QA = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
      ("Say hello in Portuguese.", "Olá!"), ("What colour is the sky?", "Blue."),
      ("Name a fruit.", "Apple."), ("What is the opposite of hot?", "Cold.")]


def write_alpaca(path: Path, n: int = 6, repeat: int = 1) -> Path:
    """QA[:n] as an alpaca jsonl file, each record `repeat` times."""
    import json

    rows = [json.dumps({"instruction": q, "input": "", "output": a}) for q, a in QA[:n]] * repeat
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def spy_model(monkeypatch):
    """The model a stage trains and a copy of its weights before training: a spy around the real
    loader (core.stages.common.load_trainable_model), which still does all the work."""
    from core.stages import common

    seen = {}
    real = common.load_trainable_model

    def spy(*a, **kw):
        model, dtype = real(*a, **kw)
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model, dtype

    monkeypatch.setattr(common, "load_trainable_model", spy)
    return seen


def live_processes(pids) -> list[int]:
    """The pids that still run (zombies and vanished processes left out): the process-tree checks
    after an abort or Ctrl+C."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out
