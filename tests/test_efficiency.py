"""Efficiency options: packing math, chunked cross-entropy, the LoRA family, optimizers, QLoRA
details, boosters and their fallbacks. Each option is checked where it lands (peft config,
optimizer, attention, quantization state) and trained for two steps on the tiny model."""
import json
import logging
import os
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

    from core.model.chunked_ce import chunked_lm_loss

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,softcap,scale", [(False, None, None), (True, 30.0, 0.5)])
def test_fused_chunked_ce_matches_plain_cross_entropy(dtype, bias, softcap, scale):
    """The fused path (gradients made in the forward pass) against F.cross_entropy on whole logits:
    loss and the gradients of hidden states, head weight and bias; and the checkpointed path (a
    head that is not a plain Linear) gives the same."""
    import torch.nn.functional as F

    from core.model.chunked_ce import _fusable, chunked_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100

    def reference():
        z = head(hidden[:, :-1]).float()
        z = z * scale if scale else z
        z = torch.tanh(z / softcap) * softcap if softcap else z
        return F.cross_entropy(z.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)

    def grads(fn):
        head.zero_grad()
        hidden.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = fn()
        loss.backward()
        return [loss.detach()] + [t.grad.clone() for t in (hidden, head.weight) + ((head.bias,) if bias else ())]

    want = grads(reference)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert _fusable(head)
    fused = grads(lambda: chunked_lm_loss(hidden, labels, head, softcap=softcap, logit_scale=scale, chunk_tokens=5))
    wrapped = torch.nn.Sequential(head)  # not a plain Linear: the checkpointed path
    wrapped.weight = head.weight
    assert not _fusable(wrapped)
    ckpt = grads(lambda: chunked_lm_loss(hidden, labels, wrapped, softcap=softcap, logit_scale=scale,
                                         chunk_tokens=5))
    for got in (fused, ckpt):
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_chunked_ce_is_on_for_big_vocabularies_and_trains(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from core.stages import sft
    from core.stages.efficiency import chunked_ce_wanted

    small = dict(batch_size=2, block_size=256)
    assert chunked_ce_wanted(LLMTrainingParams(**small), SimpleNamespace(vocab_size=262_144))
    assert not chunked_ce_wanted(LLMTrainingParams(**small), SimpleNamespace(vocab_size=32_000))
    # a 49k vocabulary at batch 8 x 256: 402 MB of fp32 logits, so on
    assert chunked_ce_wanted(LLMTrainingParams(batch_size=8, block_size=256), SimpleNamespace(vocab_size=49_152))
    assert not chunked_ce_wanted(LLMTrainingParams(chunked_ce=False, **small), SimpleNamespace(vocab_size=262_144))
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o", chunked_ce=True,
                    max_steps=2)
    assert Project(p, process=False).create() == 0
    log = (tmp_path / "o" / "running.log").read_text()
    assert "chunked cross-entropy" in log


PEAK = r"""
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from core.model.chunked_ce import chunked_lm_loss
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


@pytest.mark.slow
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
    assert res["chunked"][1] < 0.2 * res["plain"][1], res  # measured: 1686 MB -> 147 MB (fused)


# ---------------------------------------------------------------------------- the LoRA family

def _load(tiny_model_dir, tmp_path, **kw):
    from core.stages.common import load_trainable_model

    p = base_params(tiny_model_dir, tmp_path / "unused.jsonl", tmp_path / "run", **kw)
    return load_trainable_model(p, tiny_model_dir)[0]


def test_rslora_dora_and_additional_targets_reach_peft(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir, tmp_path, peft=True, lora_r=4, lora_alpha=8, use_rslora=True, use_dora=True,
                  additional_target="lm_head")
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora and "lm_head" in cfg.modules_to_save
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in q.lora_magnitude_vector  # DoRA's magnitude
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_lora_family_trains_two_steps(tiny_model_dir, tmp_path, spy_model):
    out = tmp_path / "o"
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), out, peft=True, use_rslora=True,
                    use_dora=True, additional_target="lm_head", loraplus_lr_ratio=4, max_steps=2, lr=1e-2,
                    merge_adapter=False)
    assert Project(p, process=False).create() == 0
    model, before = spy_model["model"], spy_model["before"]
    changed = {n for n, q in model.named_parameters() if not torch.equal(q.detach(), before[n])}
    assert any("lora_B" in n for n in changed) and any("lora_magnitude_vector" in n for n in changed)
    assert any("lm_head.modules_to_save" in n for n in changed)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"] and saved["modules_to_save"] == ["lm_head"]


def test_loraplus_gives_b_matrices_the_lr_times_ratio(tiny_model_dir, tmp_path):
    from core.stages import sft
    from core.stages.efficiency import configure_trainer

    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o", peft=True,
                    loraplus_lr_ratio=16, lr=1e-3)
    trainer, *_ = sft.build_trainer(p, tmp_path / "o")
    configure_trainer(trainer, p, trainer.model.config)
    opt = trainer.create_optimizer()
    names = {id(q): n for n, q in trainer.model.named_parameters()}
    lrs = {names[id(q)]: g["lr"] for g in opt.param_groups for q in g["params"]}
    assert lrs and all(lr == pytest.approx(1.6e-2) for n, lr in lrs.items() if "lora_B" in n)
    assert all(lr == pytest.approx(1e-3) for n, lr in lrs.items() if "lora_A" in n)
    assert set(lrs) == {n for n, q in trainer.model.named_parameters() if q.requires_grad}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pissa_trains_and_saves_a_plain_lora_of_the_original_base(tiny_model_dir, tmp_path, spy_model):
    from core.model.loader import load_for_inference

    out = tmp_path / "pissa"
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), out, peft=True, pissa_init=True,
                    lora_r=4, lora_dropout=0.0, max_steps=2, lr=1e-2)
    assert Project(p, process=False).create() == 0
    trained = spy_model["model"].eval()
    assert trained.peft_config["default"].init_lora_weights.startswith("pissa")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8  # converted: rank 2r on the original base
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    want = _logits(trained, ids)
    for path in (out, out / "merged"):  # both reload the original base from disk
        model, _ = load_for_inference(str(path))
        torch.testing.assert_close(_logits(model, ids), want, atol=1e-4, rtol=1e-4)


def test_create_new_adapter_stacks_on_the_merged_old_one(tiny_model_dir, tmp_path, spy_model):
    from core.model.loader import load_for_inference

    data = write_alpaca(tmp_path / "t.jsonl")
    first = tmp_path / "first"
    assert Project(base_params(tiny_model_dir, data, first, peft=True, max_steps=2, lr=2e-2,
                               merge_adapter=False), process=False).create() == 0
    second = tmp_path / "second"
    p = base_params(tiny_model_dir, data, second, peft=True, max_steps=2, lr=2e-2, adapter_path=str(first),
                    create_new_adapter=True, merge_adapter=False)
    assert Project(p, process=False).create() == 0
    trained = spy_model["model"].eval()
    assert all("lora_" in n for n, q in trained.named_parameters() if q.requires_grad)
    saved = json.loads((second / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(second / "base_merged")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model, _ = load_for_inference(str(second))
    torch.testing.assert_close(_logits(model, ids), _logits(trained, ids), atol=1e-4, rtol=1e-4)
    base, _ = load_for_inference(str(first))
    assert not torch.allclose(_logits(base, ids), _logits(trained, ids))  # the new adapter trained


def test_lora_options_need_lora_and_new_adapter_needs_one():
    with pytest.raises(ValueError, match="--use-dora is a LoRA option"):
        LLMTrainingParams(use_dora=True)
    with pytest.raises(ValueError, match="give --adapter-path"):
        LLMTrainingParams(peft=True, create_new_adapter=True)


# ---------------------------------------------------------------------------- optimizers and schedulers

def test_optimizer_and_scheduler_names_are_checked():
    with pytest.raises(ValueError, match=r"--optimizer 'adamw_fast' is unknown.*galore_adamw.*adam_mini"):
        LLMTrainingParams(optimizer="adamw_fast")
    with pytest.raises(ValueError, match=r"--scheduler 'cosinus' is unknown.*cosine_with_restarts"):
        LLMTrainingParams(scheduler="cosinus")
    assert LLMTrainingParams(optimizer="adafactor", scheduler="constant_with_warmup").optimizer == "adafactor"
    with pytest.raises(ValueError, match="not LoRA"):
        LLMTrainingParams(peft=True, optimizer="galore_adamw")


OPTIMIZERS = {"adam_mini": ("adam_mini", "adam_mini.Adam_mini"), "badam": ("badam", "badam.BlockOptimizer"),
              "galore_adamw": ("galore_torch", "galore_torch.AdamW"), "apollo_adamw": ("apollo_torch", "apollo_torch.AdamW"),
              "adafactor": (None, "transformers.Adafactor")}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_builds_and_trains_two_steps(name, tiny_model_dir, tmp_path):
    from core.stages import sft
    from core.stages.efficiency import configure_trainer

    package, cls = OPTIMIZERS[name]
    if package:
        pytest.importorskip(package)
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o", optimizer=name,
                    max_steps=2, lr=1e-3, badam_switch_interval=1, optim_args="rank=8"
                    if name.startswith(("galore", "apollo")) else None)
    trainer, *_ = sft.build_trainer(p, tmp_path / "o")
    configure_trainer(trainer, p, trainer.model.config)
    before = {n: q.detach().clone() for n, q in trainer.model.named_parameters()}
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}" == cls
    assert trainer.state.global_step == 2
    changed = [n for n, q in trainer.model.named_parameters() if not torch.equal(q.detach(), before[n])]
    assert changed, "no parameter moved"


def test_missing_optimizer_package_names_the_pip_line(monkeypatch):
    import importlib.util

    from core.errors import ConfigError
    from core.stages.efficiency import check_optimizer_packages

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "galore_torch" else real(n, *a))
    with pytest.raises(ConfigError, match="pip install galore-torch"):
        check_optimizer_packages(LLMTrainingParams(optimizer="galore_adamw"))


# ---------------------------------------------------------------------------- quantization

def test_bnb_4bit_details_reach_the_quantized_layers(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = _load(tiny_model_dir, tmp_path, peft=True, quantization="int4", bnb_4bit_quant_type="fp4",
                  double_quantization=False, compute_dtype="bf16")
    qc = model.base_model.model.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "fp4" and m.compute_dtype == torch.bfloat16 for m in layers)


def test_hqq_quantizes_and_trains_lora(tiny_model_dir, tmp_path, spy_model):
    pytest.importorskip("hqq")
    out = tmp_path / "hqq"
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), out, peft=True, quantization="int4",
                    quantization_method="hqq", max_steps=2, lr=2e-2)
    assert Project(p, process=False).create() == 0
    model = spy_model["model"]
    assert any(type(m).__name__ == "HqqLoraLinear" for m in model.modules())
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert (out / "merged" / "config.json").is_file()


def test_prequantized_checkpoints_need_their_package(tiny_model_dir, tmp_path):
    import shutil

    from core.errors import ConfigError

    gptq = tmp_path / "gptq-model"
    shutil.copytree(tiny_model_dir, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(cfg))
    if not any(__import__("importlib").util.find_spec(m) for m in ("gptqmodel", "auto_gptq")):
        with pytest.raises(ConfigError, match="GPTQ checkpoint.*pip install gptqmodel"):
            _load(gptq, tmp_path, peft=True)
    with pytest.raises(ConfigError, match="already quantized"):
        _load(gptq, tmp_path, peft=True, quantization="int4")


# ---------------------------------------------------------------------------- boosters and memory

@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    """caplog that also sees the 'aitraining' logger (an in-process run stops its propagation)."""
    monkeypatch.setattr(logging.getLogger("aitraining"), "propagate", True)
    return caplog


def test_unsloth_fallbacks_each_say_why(warnings_seen):
    caplog = warnings_seen
    from core.model.boosters import UNSLOTH_WARNING, use_unsloth

    cases = [(dict(peft=True), "gemma3", "does not support model type 'gemma3'"),
             (dict(peft=True, quantization="int4"), "llama", UNSLOTH_WARNING)]
    for kw, model_type, message in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="aitraining"):
            assert use_unsloth(LLMTrainingParams(unsloth=True, **kw), model_type) is False
        assert message in caplog.text
    assert use_unsloth(LLMTrainingParams(), "llama") is False


def test_liger_neftune_and_attention_reach_the_trainer(tiny_model_dir, tmp_path, warnings_seen):
    caplog = warnings_seen
    from core.stages import sft

    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o", liger_kernel=True,
                    neftune_noise_alpha=5.0, use_flash_attention_2=True, max_steps=2)
    with caplog.at_level(logging.WARNING):
        trainer, *_ = sft.build_trainer(p, tmp_path / "o")
    assert trainer.args.use_liger_kernel is False and "--liger-kernel needs a CUDA GPU" in caplog.text
    assert "Flash Attention 2 was requested" in caplog.text
    assert trainer.model.config._attn_implementation == "sdpa"
    assert trainer.args.neftune_noise_alpha == 5.0
    seen = []
    emb = trainer.model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    trainer.train()
    hook.remove()
    assert trainer.state.global_step == 2 and seen
    with torch.no_grad():  # after training NEFTune's hook is gone: clean embeddings again
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(emb(ids), trainer.model.get_input_embeddings().weight[ids])


@pytest.mark.slow
def test_cli_names_a_bad_optimizer_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "core.cli", "llm", "--dry-run", "--data-path", "identity",
                          "--project-name", str(tmp_path / "x"), "--optimizer", "adamw_fast"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr[-1500:]
    assert "adamw_fast" in out.stderr and "galore_adamw" in out.stderr and "Traceback" not in out.stderr


def test_pt_neat_packing_keeps_documents_whole_and_trains(tiny_model_dir, tmp_path):
    from core.stages import pt
    from test_stage_pt import DOCS, write_text
    from test_stage_pt import base_params as pt_params

    p = pt_params(tiny_model_dir, write_text(tmp_path / "d.jsonl", DOCS * 2), tmp_path / "o", block_size=96,
                  neat_packing=True, max_steps=2)
    trainer, *_ = pt.build_trainer(p, tmp_path / "o")
    rows = list(trainer.train_dataset)
    assert len(rows) < len(DOCS) * 2 and all(len(r["input_ids"]) <= 96 for r in rows)
    assert sum(r["position_ids"].count(0) for r in rows) == len(DOCS) * 2  # every document starts at 0
    trainer.train()
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------------- the CPU allocator

def test_cpu_runs_train_with_jemalloc(tiny_model_dir, tmp_path):
    """A CPU run's process gets jemalloc preloaded (glibc's malloc keeps freed activation memory:
    bench/allocator.py), unless the user preloads something else or asks for the system one."""
    from core import launch
    from core.errors import ConfigError

    lib = launch.jemalloc_path()
    assert lib, "libjemalloc2 is not installed: scripts/install.sh installs it (apt-get install libjemalloc2)"
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "o", max_steps=1)
    cfg = tmp_path / "c.yaml"
    _, env = launch.prepare(p, cfg, base_env={"PATH": os.environ["PATH"]})
    assert env["LD_PRELOAD"] == lib and env["MALLOC_CONF"] == launch.JEMALLOC_CONF
    assert "LD_PRELOAD" not in launch.prepare(p, cfg, base_env={"AITRAINING_ALLOCATOR": "system"})[1]
    assert launch.prepare(p, cfg, base_env={"LD_PRELOAD": "/opt/mine.so"})[1]["LD_PRELOAD"] == "/opt/mine.so"
    with pytest.raises(ConfigError, match="AITRAINING_ALLOCATOR='tcmalloc'.*jemalloc.*system"):
        launch.prepare(p, cfg, base_env={"AITRAINING_ALLOCATOR": "tcmalloc"})
    assert Project(p).create() == 0  # a real training subprocess, started the way the CLI and UI start it
    assert "memory allocator: jemalloc" in (tmp_path / "o" / "running.log").read_text()
