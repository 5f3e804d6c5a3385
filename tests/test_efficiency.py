"""Efficiency options: packing math, chunked cross-entropy, the LoRA family, optimizers, QLoRA
details, boosters and their fallbacks. Each option is checked where it lands (peft config,
optimizer, attention, quantization state) and trained for two steps on the tiny model."""
import json
import logging
import subprocess
import sys

import pytest
import torch

from core import Project
from core.params import LLMTrainingParams

from conftest import REPO, write_alpaca
from test_sft import base_params


def _examples(tok, n=5):
    from core.data.tokenize import tokenize_dataset
    from conftest import QA

    records = [{"messages": [{"role": "user", "content": q * (i + 1)}, {"role": "assistant", "content": a}]}
               for i, (q, a) in enumerate(QA[:n])]
    return tokenize_dataset(tok, records, "chatml", cutoff_len=256)


def _model(tiny_model_dir, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()


# ---------------------------------------------------------------------------- packing

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_neat_packed_loss_equals_examples_run_one_by_one(attn, tiny_model_dir, tiny_tokenizer):
    from core.data.tokenize import NeatPackCollator, neat_pack_dataset

    ds = _examples(tiny_tokenizer)
    model = _model(tiny_model_dir, attn)
    # one by one: each example's summed token loss (labels shifted inside the model)
    total, count = 0.0, 0
    for ex in ds:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    expected = total / count

    lengths = [len(x) for x in ds["input_ids"]]
    packed = neat_pack_dataset(ds, cutoff_len=max(lengths) + 40)
    assert len(packed) < len(ds)  # several examples share a row
    assert sorted(sum(map(len, packed["input_ids"])) for _ in [0]) == [sum(lengths)]
    batch = NeatPackCollator(tiny_tokenizer.pad_token_id)(list(packed))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(packed)
    with torch.no_grad():
        got = model(**batch).loss.item()
    assert got == pytest.approx(expected, abs=1e-5)

    # the contrast: the same rows with position ids running on (plain concatenation) differ
    plain = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    with torch.no_grad():
        assert abs(model(**plain).loss.item() - expected) > 1e-3


def test_neat_packing_trains_through_sft(tiny_model_dir, tmp_path):
    from core.events import read_log
    from core.stages import sft

    data = write_alpaca(tmp_path / "t.jsonl", repeat=2)
    p = base_params(tiny_model_dir, data, tmp_path / "o", peft=True, neat_packing=True, block_size=128,
                    max_steps=2, lr=2e-2)
    trainer, *_ = sft.build_trainer(p, tmp_path / "o")
    assert "position_ids" in trainer.train_dataset.column_names
    assert len(trainer.train_dataset) < 12
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["use_cache"] is False and (batch["position_ids"][0] == 0).sum() > 1
    assert Project(p, process=False).create() == 0
    losses = [r["loss"] for r in read_log(tmp_path / "o" / "trainer_log.jsonl")[0] if r.get("loss") is not None]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_group_by_length_reaches_the_trainer(tiny_model_dir, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from core.stages import sft

    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o", group_by_length=True)
    trainer, *_ = sft.build_trainer(p, tmp_path / "o")
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o2", group_by_length=True,
                    packing=True, block_size=64)
    trainer, *_ = sft.build_trainer(p, tmp_path / "o2")
    assert not isinstance(trainer._get_train_sampler(), LengthGroupedSampler)  # packed rows: all one length


# ---------------------------------------------------------------------------- chunked cross-entropy

def test_chunked_ce_equals_the_model_loss_and_its_gradients(tiny_model_dir, tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    from core.stages.efficiency import chunked_lm_loss

    ds = _examples(tiny_tokenizer)
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, label_pad_token_id=-100)(list(ds))
    model = _model(tiny_model_dir)
    plain = model(**batch).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    labels = batch.pop("labels")
    out = model(**batch, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
    assert out.logits.numel() == 0  # no logits were made
    chunked = chunked_lm_loss(out.hidden_states[-1], labels, model.lm_head, chunk_tokens=7)
    chunked.backward()
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_chunked_ce_is_on_for_big_vocabularies_and_trains(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from core.stages import sft
    from core.stages.efficiency import chunked_ce_wanted

    assert chunked_ce_wanted(LLMTrainingParams(), SimpleNamespace(vocab_size=262_144))
    assert not chunked_ce_wanted(LLMTrainingParams(), SimpleNamespace(vocab_size=32_000))
    assert not chunked_ce_wanted(LLMTrainingParams(chunked_ce=False), SimpleNamespace(vocab_size=262_144))
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o", chunked_ce=True,
                    max_steps=2)
    assert Project(p, process=False).create() == 0
    log = (tmp_path / "o" / "running.log").read_text()
    assert "chunked cross-entropy" in log


PEAK = r"""
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from core.stages.efficiency import chunked_lm_loss
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=150_000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg)
ids = torch.randint(0, cfg.vocab_size, (2, 512))
model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()  # warm up allocator and kernels
model.zero_grad()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "chunked":
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
    loss = chunked_lm_loss(out.hidden_states[-1], ids, model.lm_head)
else:
    loss = model(input_ids=ids, labels=ids).loss
loss.backward()
print(loss.item(), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_chunked_ce_lowers_peak_memory_with_a_big_vocabulary():
    """Same loss, far less memory: 1024 tokens x 150k vocab of fp32 logits is 600 MB (plus its
    gradient and softmax), a chunk of them is a fraction. Peak RSS growth measured in fresh processes."""
    res = {}
    for mode in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True, cwd=REPO,
                             timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-2000:]
        loss, mb = map(float, out.stdout.split()[-2:])
        res[mode] = (loss, mb)
    assert res["chunked"][0] == pytest.approx(res["plain"][0], abs=1e-4)
    assert res["plain"][1] > 600, res
    assert res["chunked"][1] < 0.5 * res["plain"][1], res
