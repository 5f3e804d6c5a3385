"""Pre-training (--trainer pt) on a tiny random Llama: documents joined with EOS and cut into
exact blocks (checked token by token), the loss falls for full, freeze and LoRA, flags reach the
trainer, the demo_pretrain dataset trains from the CLI, and a run goes through the web UI runner."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from core import LLMTrainingParams, Project
from core.data.tokenize import pack_dataset
from core.errors import DataError
from core.events import read_log, read_status
from core.stages import STAGES, pt

DOCS = ["The river town woke slowly.", "Bees dance to show where flowers are.",
        "A lighthouse keeper kept a diary.", "Bread smells good in the morning."]

def write_text(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path

def base_params(tiny_model_dir, data, out, **kw):
    defaults = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer="pt",
                    block_size=16, epochs=10, batch_size=2, gradient_accumulation=1, lr=5e-3, warmup_ratio=0.0,
                    logging_steps=1, log="none", eval_strategy="no", save_strategy="no")
    defaults.update(kw)
    return LLMTrainingParams(**defaults)

def test_pt_is_a_registered_stage():
    assert STAGES["pt"].data_kind == "text"

def test_packing_makes_exact_blocks_with_eos_between_documents(tiny_tokenizer):
    docs = pt.tokenize_documents(tiny_tokenizer, [{"text": d} for d in DOCS] + [{"text": "  "}])
    eos = tiny_tokenizer.eos_token_id
    expected = []
    for d in DOCS:  # each document, then eos (the blank one is skipped)
        expected += tiny_tokenizer(d)["input_ids"] + [eos]
    assert [t for row in docs["input_ids"] for t in row] == expected
    block = 16
    packed = pack_dataset(docs, cutoff_len=block, pad_token_id=tiny_tokenizer.pad_token_id)
    n_full, rest = divmod(len(expected), block)
    assert rest and len(packed) == n_full + 1
    assert all(len(row) == block for row in packed["input_ids"])
    flat = [t for row in packed["input_ids"] for t in row]
    assert flat[:len(expected)] == expected  # same tokens, same order, eos at every document end
    assert flat.count(eos) == len(DOCS)
    for i in range(n_full):
        assert packed[i]["labels"] == packed[i]["input_ids"] and packed[i]["attention_mask"] == [1] * block
    last = packed[n_full]  # the tail: padded, masked out of attention and loss
    assert last["attention_mask"] == [1] * rest + [0] * (block - rest)
    assert last["labels"] == expected[n_full * block:] + [-100] * (block - rest)
    assert last["input_ids"][rest:] == [tiny_tokenizer.pad_token_id] * (block - rest)
    # without a pad token the tail is dropped; labels already masked travel with their tokens
    dropped = pack_dataset([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6]}],
                           cutoff_len=4)
    assert dropped["input_ids"] == [[1, 2, 3, 4]] and dropped["labels"] == [[-100, 2, 3, 4]]
    with pytest.raises(DataError, match="less than one block"):
        pack_dataset([{"input_ids": [1, 2]}], cutoff_len=4)
    # --no-add-eos-token: documents run into each other
    plain = pt.tokenize_documents(tiny_tokenizer, [{"text": d} for d in DOCS], add_eos_token=False)
    assert eos not in [t for row in plain["input_ids"] for t in row]

def test_flags_reach_the_trainer(tiny_model_dir, tmp_path):
    data = write_text(tmp_path / "train.jsonl", DOCS * 3)
    p = base_params(tiny_model_dir, data, tmp_path / "run", lr=1.5e-3, batch_size=3, gradient_accumulation=2,
                    block_size=32, val_size=2, eval_strategy="epoch", weight_decay=0.01, scheduler="cosine")
    trainer, tok, template, has_eval = pt.build_trainer(p, tmp_path / "run")
    a = trainer.args
    assert (a.learning_rate, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (1.5e-3, 3, 2)
    assert a.weight_decay == 0.01 and a.lr_scheduler_type == "cosine" and a.eval_strategy == "epoch"
    assert has_eval and template is None
    assert {len(r) for r in trainer.train_dataset["input_ids"]} == {32}
    assert {len(r) for r in trainer.eval_dataset["input_ids"]} == {32}
    # -1: the model's context (512 for the tiny Llama), capped at 1024 for pt
    assert pt.block_size(p.model_copy(update={"block_size": -1}), trainer.model.config) == 512
    trainer.model.config.max_position_embeddings = 4096
    big = p.model_copy(update={"block_size": -1, "model_max_length": 8192})
    assert pt.block_size(big, trainer.model.config) == 1024
    # --packing false: one example per document, truncated at the block size
    trainer, *_ = pt.build_trainer(p.model_copy(update={"packing": False, "block_size": 8}), tmp_path / "run")
    assert len(trainer.train_dataset) == len(DOCS) * 3 - 2
    assert max(len(r) for r in trainer.train_dataset["input_ids"]) == 8


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_pt_loss_falls(method, tiny_model_dir, tmp_path, spy_model):
    data = write_text(tmp_path / "train.jsonl")
    out = tmp_path / f"run-{method}"
    p = base_params(tiny_model_dir, data, out, finetuning_type=method, freeze_trainable_layers=1,
                    lr={"full": 5e-3, "freeze": 2e-2, "lora": 2e-2}[method])
    assert Project(p, process=False).create() == 0
    model, before = spy_model["model"], spy_model["before"]
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    for name, param in model.named_parameters():
        assert (not torch.equal(param.detach(), before[name])) == (name in trainable), name
    losses = [r["loss"] for r in read_log(out / "trainer_log.jsonl")[0] if r.get("loss") is not None]
    assert len(losses) >= 10
    assert losses[-1] < 0.5 * losses[0], losses
    assert read_status(out)["state"] == "finished"
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (out / weights).is_file() and (out / "tokenizer_config.json").is_file()

def test_cli_trains_demo_pretrain(tiny_model_dir, tmp_path):
    out = tmp_path / "cli-pt"
    cmd = [shutil.which("aitraining"), "llm", "--train", "--trainer", "pt", "--model", str(tiny_model_dir),
           "--data-path", "demo_pretrain", "--project-name", str(out), "--peft", "--block-size", "64",
           "--max-steps", "2", "--log", "none", "--batch-size", "2", "--gradient-accumulation", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_status(out)["state"] == "finished"
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    running = (out / "running.log").read_text()
    assert "blocks of 64 tokens" in running  # the 30 demo documents, packed

def test_web_ui_runner_runs_pt(tiny_model_dir, tmp_path):
    from webui.runner import Runner

    data = write_text(tmp_path / "train.jsonl")
    out = tmp_path / "runs" / "ui-pt"
    runner = Runner(tmp_path / "runs")
    run_dir = runner.start(base_params(tiny_model_dir, data, out, epochs=1, finetuning_type="lora"))
    deadline = time.time() + 240
    while read_status(run_dir).get("state") not in ("finished", "failed", "aborted"):
        assert time.time() < deadline, read_status(run_dir)
        time.sleep(0.5)
    assert read_status(run_dir)["state"] == "finished", (run_dir / "console.log").read_text()[-3000:]
    assert (run_dir / "adapter_model.safetensors").is_file()
