"""Preference stages (dpo, orpo, simpo, kto) end to end on a tiny random Llama and a toy set that
is trivially separable (the preferred answer is always "Yes, gladly.", the other "No way."):
training must widen the chosen-minus-rejected log-probability margin, measured here with the
model itself before and after, and the trainer's own reward metrics must reach trainer_log.jsonl.
Each stage's flags are checked on the TRL trainer's config, not on our params."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from core import LLMTrainingParams, Project
from core.errors import ConfigError
from core.events import read_log, read_status
from core.stages import STAGES, dpo, kto, orpo, simpo
from core.stages.preference import TruncatingCollator

PROMPTS = ["Is the sky blue?", "Do you like tea?", "Can birds fly?", "Is water wet?", "Shall we go?",
           "Ready now?"]
GOOD, BAD = "Yes, gladly.", "No way."

def write_pairs(path: Path) -> Path:
    rows = [{"prompt": q, "chosen": GOOD, "rejected": BAD} for q in PROMPTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path

def write_kto(path: Path) -> Path:
    """Every prompt twice: once with the desirable answer, once with the undesirable one."""
    rows = [{"prompt": q, "completion": a, "label": a == GOOD} for q in PROMPTS for a in (GOOD, BAD)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path

def base_params(tiny_model_dir, data, out, trainer, **kw):
    defaults = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer=trainer,
                    chat_template="chatml", prompt_text_column="prompt", rejected_text_column="rejected",
                    text_column="completion" if trainer == "kto" else "chosen",
                    epochs=2, batch_size=2, gradient_accumulation=1, lr=1e-2, warmup_ratio=0.0,
                    logging_steps=1, log="none", eval_strategy="no", save_strategy="no")
    defaults.update(kw)
    return LLMTrainingParams(**defaults)

def answer_logp(model, tok, prompt: str, answer: str) -> float:
    """log p(answer | prompt) under the chat template the run trained with, summed over the
    answer's tokens (our own measurement, independent of TRL's)."""
    msgs = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(head)
    n = len(tok(head, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logps[n - 1:].gather(-1, targets[n - 1:, None]).sum().item()

def margin(model_dir, tok) -> float:
    """Mean over the training prompts of log p(GOOD) - log p(BAD)."""
    from core.model.loader import load_for_inference

    model, _ = load_for_inference(str(model_dir))
    model.eval()
    return sum(answer_logp(model, tok, q, GOOD) - answer_logp(model, tok, q, BAD) for q in PROMPTS) / len(PROMPTS)


CASES = [  # (trainer, method, epochs, lr): enough steps on 6 pairs for a clear move, no more
    ("dpo", "full", 2, 5e-3), ("dpo", "freeze", 2, 2e-2), ("dpo", "lora", 2, 1e-2),
    ("orpo", "lora", 3, 2e-2), ("simpo", "lora", 3, 2e-2), ("kto", "lora", 2, 1e-2),
]


@pytest.mark.parametrize("trainer,method,epochs,lr", CASES, ids=[f"{t}-{m}" for t, m, *_ in CASES])
def test_stage_trains_toward_the_preferred_answer(trainer, method, epochs, lr, tiny_model_dir, tmp_path,
                                                  spy_model):
    from transformers import AutoTokenizer

    data = (write_kto if trainer == "kto" else write_pairs)(tmp_path / "train.jsonl")
    out = tmp_path / f"{trainer}-{method}"
    p = base_params(tiny_model_dir, data, out, trainer, finetuning_type=method, freeze_trainable_layers=1,
                    epochs=epochs, lr=lr)
    assert Project(p, process=False).create() == 0
    assert read_status(out)["state"] == "finished", read_status(out)

    # only what the method makes trainable moved (TRL's LoRA reference adapter stays put)
    model, before = spy_model["model"], spy_model["before"]
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable
    for name, param in model.named_parameters():
        if name in before:
            assert (not torch.equal(param.detach(), before[name])) == (name in trainable), name
    if method == "freeze":
        assert all(".layers.1." in n for n in trainable), sorted(trainable)

    # our own measurement: the preferred answer gained on the other one
    tok = AutoTokenizer.from_pretrained(out)  # carries the chatml template the run trained with
    assert "<|im_start|>" in tok.chat_template
    m_before, m_after = margin(tiny_model_dir, tok), margin(out, tok)
    print(f"{trainer}-{method}: log p(chosen) - log p(rejected) {m_before:.2f} -> {m_after:.2f}")
    assert m_after > m_before + 3.0, (m_before, m_after)

    # the trainer's reward metrics reach the run log, and they rise too
    records, _ = read_log(out / "trainer_log.jsonl")
    steps = [r for r in records if r.get("loss") is not None]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(isinstance(r.get(key), float) for r in steps), key
    if trainer != "kto":
        assert "rewards/accuracies" in steps[-1]
    first, last = steps[0]["rewards/margins"], sum(r["rewards/margins"] for r in steps[-3:]) / 3
    assert last > first, [r["rewards/margins"] for r in steps]

    if method == "lora":
        assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
        assert not (out / "ref").exists()  # TRL's reference adapter is not part of the result
        assert list(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    else:
        assert (out / "model.safetensors").is_file()

def test_each_stage_hands_its_flags_to_the_trl_config(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    kdata = write_kto(tmp_path / "kto.jsonl")
    common_kw = dict(peft=True, dpo_beta=0.25, lr=1e-3, max_steps=3)

    t, *_ = dpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "a", "dpo", pref_loss="sigmoid",
                                          dpo_label_smoothing=0.1, pref_ftx=0.5, **common_kw), tmp_path / "a")
    a = t.args
    assert type(a).__name__ == "DPOConfig" and type(t).__name__ == "DPOTrainer"
    assert (a.beta, a.loss_type, a.loss_weights, a.label_smoothing) == (0.25, ["robust", "sft"], [1.0, 0.5], 0.1)
    assert (a.learning_rate, a.max_steps, a.activation_checkpointing, a.gradient_checkpointing, a.bf16) == (
        1e-3, 3, False, False, False)

    t, *_ = dpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "b", "dpo", pref_loss="ipo",
                                          dpo_label_smoothing=0.2, **common_kw), tmp_path / "b")
    assert (t.args.loss_type, t.args.loss_weights, t.args.label_smoothing) == (["ipo"], [1.0], 0.0)

    t, *_ = orpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "c", "orpo", **common_kw),
                               tmp_path / "c")
    assert type(t).__name__ == "ORPOTrainer" and t.args.beta == 0.25 and t.beta == 0.25

    t, *_ = simpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "d", "simpo", simpo_gamma=1.5,
                                            pref_ftx=0.2, **common_kw), tmp_path / "d")
    a = t.args
    assert type(t).__name__ == "CPOTrainer"
    assert (a.loss_type, a.simpo_gamma, a.cpo_alpha, a.beta) == ("simpo", 1.5, 0.2, 0.25)
    t, *_ = simpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "e", "simpo", **common_kw),
                                tmp_path / "e")
    assert t.args.cpo_alpha == 0.0 and t.args.simpo_gamma == 0.5  # plain SimPO by default

    t, *_ = kto.build_trainer(base_params(tiny_model_dir, kdata, tmp_path / "f", "kto", kto_chosen_weight=1.5,
                                          kto_rejected_weight=0.5, **common_kw), tmp_path / "f")
    a = t.args
    assert type(a).__name__ == "KTOConfig"
    assert (a.beta, a.desirable_weight, a.undesirable_weight) == (0.25, 1.5, 0.5)

def test_unusable_combinations_are_refused_with_a_fix(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    p = base_params(tiny_model_dir, data, tmp_path / "a", "dpo", peft=True, dpo_label_smoothing=0.5)
    with pytest.raises(ConfigError, match="below 0.5"):
        dpo.build_trainer(p, tmp_path / "a")
    p = base_params(tiny_model_dir, write_kto(tmp_path / "k.jsonl"), tmp_path / "b", "kto", peft=True, batch_size=1)
    with pytest.raises(ConfigError, match="--batch-size 2"):
        kto.build_trainer(p, tmp_path / "b")

def test_reference_model_per_method(tiny_model_dir, tmp_path, tmp_path_factory):
    from conftest import build_tiny_model

    data = write_pairs(tmp_path / "pairs.jsonl")
    # full: a frozen copy of the weights as loaded
    t, *_ = dpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "a", "dpo"), tmp_path / "a")
    ref = t.ref_model
    assert ref is not None and ref is not t.model and not any(q.requires_grad for q in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), t.model.state_dict().values()))
    # LoRA: no second model; TRL uses the base under the adapter
    t, *_ = dpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "b", "dpo", peft=True), tmp_path / "b")
    assert t.ref_model is None
    # --model-ref: that model, also with LoRA
    other = build_tiny_model(tmp_path_factory.mktemp("ref-llama"), seed=1)
    t, *_ = dpo.build_trainer(base_params(tiny_model_dir, data, tmp_path / "c", "dpo", peft=True,
                                          model_ref=str(other)), tmp_path / "c")
    w = t.ref_model.get_input_embeddings().weight
    assert not w.requires_grad
    assert not torch.equal(w, t.model.get_input_embeddings().weight)

def test_prompt_and_answer_lengths_are_capped(tiny_model_dir, tmp_path):
    # the DPO/KTO layout: prompt keeps its end, answers their start, all within the cutoff
    cut = TruncatingCollator(lambda x: x, max_prompt=3, max_completion=2, cutoff=4)
    [ex] = cut([{"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [6, 7, 8], "rejected_ids": [9],
                 "KL_completion_ids": [10, 11, 12], "label": True}])
    assert ex["prompt_ids"] == [3, 4, 5] and ex["chosen_ids"] == [6] and ex["rejected_ids"] == [9]
    assert ex["KL_completion_ids"] == [10] and ex["label"] is True
    # the ORPO/CPO layout: the prompt sits inside each sequence, marked by -100 labels
    cut = TruncatingCollator(lambda x: x, max_prompt=2, max_completion=2, cutoff=100)
    seq = {"input_ids": [1, 2, 3, 7, 8, 9], "attention_mask": [1] * 6, "labels": [-100, -100, -100, 7, 8, 9]}
    [ex] = cut([{"prompt_input_ids": [1, 2, 3], "prompt_attention_mask": [1, 1, 1],
                 **{f"chosen_{k}": v for k, v in seq.items()}, **{f"rejected_{k}": v for k, v in seq.items()}}])
    assert ex["prompt_input_ids"] == [2, 3]
    assert ex["chosen_input_ids"] == [2, 3, 7, 8] and ex["chosen_labels"] == [-100, -100, 7, 8]
    assert ex["rejected_attention_mask"] == [1, 1, 1, 1]

    # and through a real trainer: --max-prompt-length / --max-completion-length bound each batch
    p = base_params(tiny_model_dir, "demo_preference", tmp_path / "o", "dpo", peft=True, max_prompt_length=8,
                    max_completion_length=5)
    t, *_ = dpo.build_trainer(p, tmp_path / "o")
    batch = t.data_collator([t.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[1] <= 13
    assert (batch["completion_mask"].sum(1) == 5).all()  # every demo answer is longer than 5 tokens

def test_plain_text_without_a_chat_template_ends_answers_with_eos(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    p = base_params(tiny_model_dir, data, tmp_path / "o", "dpo", peft=True, chat_template="none")
    t, tok, template, _ = dpo.build_trainer(p, tmp_path / "o")
    row = t.train_dataset[0]
    assert template is None
    assert tok.decode(row["prompt_ids"]) == PROMPTS[0]
    assert row["chosen_ids"][-1] == tok.eos_token_id and tok.decode(row["chosen_ids"][:-1]) == GOOD

def test_registered_demo_datasets_load_for_their_stages(tiny_model_dir, tmp_path):
    for trainer, name, stage in (("dpo", "demo_preference", dpo), ("orpo", "demo_preference", orpo),
                                 ("kto", "demo_kto", kto)):
        p = base_params(tiny_model_dir, name, tmp_path / trainer, trainer, peft=True,
                        prompt_text_column=None, rejected_text_column=None, text_column="text")
        Project(p, process=False).check()  # the data check before a run
        t, *_ = stage.build_trainer(p, tmp_path / trainer)
        assert len(t.train_dataset) == 30, trainer
        row = t.train_dataset[0]
        assert ("completion_ids" if trainer == "kto" else "chosen_input_ids" if trainer == "orpo"
                else "chosen_ids") in row
    for name in ("dpo", "orpo", "simpo", "kto"):
        assert name in STAGES

def test_cli_dpo_in_a_subprocess(tiny_model_dir, tmp_path):
    """Seed 000's DPO example, with the tiny model."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "cli-dpo"
    cmd = [shutil.which("aitraining"), "llm", "--train", "--model", str(tiny_model_dir), "--data-path", str(data),
           "--project-name", str(out), "--trainer", "dpo", "--prompt-text-column", "prompt", "--text-column",
           "chosen", "--rejected-text-column", "rejected", "--dpo-beta", "0.2", "--peft", "--epochs", "1",
           "--batch-size", "2", "--lr", "1e-2", "--log", "none", "--chat-template", "chatml", "--logging-steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_status(out)["state"] == "finished"
    assert (out / "adapter_model.safetensors").is_file()
    records, _ = read_log(out / "trainer_log.jsonl")
    assert any("rewards/margins" in r for r in records)
    from core import config_io

    replay = config_io.loads((out / "config.yaml").read_text())
    assert (replay.trainer, replay.dpo_beta, replay.rejected_text_column) == ("dpo", 0.2, "rejected")

def test_web_ui_runner_trains_simpo(tiny_model_dir, tmp_path):
    from webui.runner import Runner

    data = write_pairs(tmp_path / "pairs.jsonl")
    root = tmp_path / "runs"
    p = base_params(tiny_model_dir, data, root / "simpo", "simpo", peft=True, epochs=1, merge_adapter=False)
    run_dir = Runner(root).start(p)
    deadline = time.time() + 300
    while read_status(run_dir).get("state") not in ("finished", "failed", "aborted") and time.time() < deadline:
        time.sleep(0.5)
    status = read_status(run_dir)
    assert status["state"] == "finished", status
    assert (run_dir / "adapter_model.safetensors").is_file()
    records, _ = read_log(run_dir / "trainer_log.jsonl")
    assert any("rewards/margins" in r for r in records)
