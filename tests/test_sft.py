"""SFT end to end on a tiny random Llama: full, freeze and LoRA really train, the run directory
is complete, outputs reload and generate, and a run resumes from its checkpoint."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from core import LLMTrainingParams, Project
from core.events import read_log, read_status

from conftest import write_alpaca


def base_params(tiny_model_dir, data, out, **kw):
    defaults = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer="sft",
                    chat_template="chatml", epochs=8, batch_size=2, gradient_accumulation=1, lr=5e-3,
                    warmup_ratio=0.0, logging_steps=1, log="none", eval_strategy="no", save_strategy="no")
    defaults.update(kw)
    return LLMTrainingParams(**defaults)


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_sft_method_trains_what_it_should(method, tiny_model_dir, tmp_path, spy_model):
    data = write_alpaca(tmp_path / "train.jsonl")
    out = tmp_path / f"run-{method}"
    p = base_params(tiny_model_dir, data, out, finetuning_type=method, freeze_trainable_layers=1,
                    epochs=20 if method == "freeze" else 8,
                    lr={"full": 5e-3, "freeze": 3e-2, "lora": 2e-2}[method])
    assert Project(p, process=False).create() == 0

    model, before = spy_model["model"], spy_model["before"]
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable, "nothing was trainable"
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
    if method == "freeze":  # last layer only
        assert all(".layers.1." in n for n in trainable), sorted(trainable)
    if method == "lora":
        assert all("lora_" in n for n in trainable)

    records, _ = read_log(out / "trainer_log.jsonl")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) >= 8
    # a small set, several epochs: the loss must fall (one frozen-head layer learns slowest)
    assert losses[-1] < (0.85 if method == "freeze" else 0.5) * losses[0], losses

    status = read_status(out)
    assert status["state"] == "finished", status
    for name in ("config.yaml", "trainer_log.jsonl", "running.log", "status.json", "loss.png", "README.md",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    if method == "lora":
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert (out / "merged" / "config.json").is_file()
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    rec = records[-1]
    for key in ("step", "total_steps", "epoch", "lr", "elapsed", "percentage"):
        assert key in rec

def test_lora_outputs_reload_and_generate(tiny_model_dir, tmp_path):
    from core.model.loader import load_for_inference

    data = write_alpaca(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    p = base_params(tiny_model_dir, data, out, peft=True, lr=2e-2, epochs=3)
    assert Project(p, process=False).create() == 0
    tok_ids = None
    logits = {}
    for path in (out, out / "merged"):
        model, tok = load_for_inference(str(path))
        assert tok.chat_template and "<|im_start|>" in tok.chat_template  # trained template travels
        ids = tok.apply_chat_template([{"role": "user", "content": "What is two plus two?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        tok_ids = ids["input_ids"]
        with torch.no_grad():
            logits[path.name] = model(input_ids=tok_ids).logits
            gen = model.generate(input_ids=tok_ids, max_new_tokens=5, do_sample=False)
        assert gen.shape[1] > tok_ids.shape[1]
    assert torch.allclose(logits["run"], logits["merged"], atol=1e-4)

def test_resume_from_checkpoint_auto_continues_at_saved_step(tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    p = base_params(tiny_model_dir, data, out, peft=True, max_steps=4, save_strategy="steps", save_steps=2,
                    save_total_limit=2, epochs=100)
    assert Project(p, process=False).create() == 0
    assert (out / "checkpoint-4").is_dir()
    first_len = (out / "trainer_log.jsonl").stat().st_size
    p2 = p.model_copy(update={"max_steps": 6, "resume_from_checkpoint": "auto"})
    assert Project(p2, process=False).create() == 0
    new, _ = read_log(out / "trainer_log.jsonl", first_len)
    steps = [r["step"] for r in new if r.get("loss") is not None]
    assert steps and min(steps) == 5 and max(steps) == 6, steps
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6

def test_cli_trains_end_to_end_in_a_subprocess(tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "train.jsonl")
    out = tmp_path / "cli-run"
    cmd = [shutil.which("aitraining"), "llm", "--train", "--model", str(tiny_model_dir),
           "--data-path", str(data), "--project-name", str(out), "--trainer", "sft", "--peft",
           "--epochs", "1", "--max-samples", "4", "--log", "none", "--chat-template", "chatml"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_status(out)["state"] == "finished"
    assert (out / "adapter_model.safetensors").is_file()
    # the run file in the directory replays the run: same bytes after a parse/dump cycle
    from core import config_io

    text = (out / "config.yaml").read_text()
    assert config_io.dumps(config_io.loads(text)) == text
    assert config_io.loads(text).max_samples == 4

def test_cli_bad_record_exits_2_without_traceback(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "x", "output": \n', encoding="utf-8")
    cmd = [sys.executable, "-m", "core.cli", "llm", "--train", "--model", str(tiny_model_dir),
           "--data-path", str(bad), "--project-name", str(tmp_path / "o"), "--log", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bad.jsonl" in proc.stderr and "record 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "status.json").exists()  # refused before a run started

def test_every_trainer_has_a_registered_stage():
    from core.params import TRAINER_STAGE
    from core.stages import STAGES

    assert set(TRAINER_STAGE.values()) == set(STAGES)
    for stage in STAGES.values():
        assert callable(stage.runner())

def test_cli_help_per_trainer():
    out = subprocess.run([sys.executable, "-m", "core.cli", "llm", "--trainer", "dpo", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "--dpo-beta" in out and "--rejected-text-column" in out and "--rl-gamma" not in out
    out = subprocess.run([sys.executable, "-m", "core.cli", "llm", "--trainer", "ppo", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "--rl-reward-model-path" in out and "--dpo-beta" not in out

def test_adapter_path_continues_an_existing_adapter(tiny_model_dir, tmp_path, spy_model):
    from safetensors.torch import load_file

    data = write_alpaca(tmp_path / "train.jsonl")
    first = tmp_path / "first"
    assert Project(base_params(tiny_model_dir, data, first, peft=True, lr=2e-2, epochs=2), process=False).create() == 0
    saved = load_file(str(first / "adapter_model.safetensors"))
    second = tmp_path / "second"
    p = base_params(tiny_model_dir, data, second, peft=True, lr=2e-2, epochs=2, adapter_path=str(first))
    assert Project(p, process=False).create() == 0
    before = {n: t for n, t in spy_model["before"].items() if "lora_" in n}
    assert len(before) == len(saved)
    for name, tensor in before.items():  # training started from the first run's adapter...
        key = next(k for k in saved if k.split("base_model.model.")[-1].replace(".weight", "")
                   in name.replace(".default", ""))
        assert torch.equal(tensor, saved[key]), name
    after = load_file(str(second / "adapter_model.safetensors"))
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # ...and kept training it

def test_rope_scaling_stretches_the_context(tiny_model_dir, tmp_path, spy_model):
    data = write_alpaca(tmp_path / "train.jsonl")
    p = base_params(tiny_model_dir, data, tmp_path / "rope", peft=True, epochs=1, rope_scaling="linear",
                    block_size=1024)  # the tiny model's native context is 512
    assert Project(p, process=False).create() == 0
    rope = spy_model["model"].config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0

def test_config_file_replays_with_eval_and_tensorboard(tiny_model_dir, tmp_path):
    """`aitraining --config run.yaml`: a run file in the seed's shape, with a validation split,
    evaluation each epoch and TensorBoard logging."""
    from core import config_io

    data = write_alpaca(tmp_path / "train.jsonl")
    out = tmp_path / "from-yaml"
    p = base_params(tiny_model_dir, data, out, peft=True, epochs=2, val_size=0.34, eval_strategy="epoch",
                    log="tensorboard", lr=2e-2)
    run_file = config_io.save(p, tmp_path / "run.yaml")
    proc = subprocess.run([shutil.which("aitraining"), "--config", str(run_file)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, _ = read_log(out / "trainer_log.jsonl")
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    assert len(evals) >= 2, records  # one per epoch (plus the final evaluation)
    assert read_status(out)["metrics"]["eval_loss"] > 0
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "config.yaml").read_text() == run_file.read_text()  # the run replays byte for byte


def test_unsloth_falls_back_with_the_seed_warning(tiny_model_dir, tmp_path, caplog):
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "u", peft=True, epochs=1,
                    unsloth=True)
    assert Project(p, process=False).create() == 0
    assert "WARNING: Unsloth not available, continuing without it..." in (tmp_path / "u" / "running.log").read_text()


def test_bf16_on_a_cpu_with_native_bf16_trains(tiny_model_dir, tmp_path, spy_model):
    """--mixed-precision bf16 on a CPU that has it: weights load in bf16, the Trainer runs (it
    refuses bf16 on a CPU unless told use_cpu), the loss falls and the LoRA weights move."""
    from core.model.loader import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (the fallback to fp32 is tested in test_model_loader)")
    out = tmp_path / "bf16"
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), out, peft=True, mixed_precision="bf16",
                    epochs=4)
    assert Project(p, process=False).create() == 0
    model = spy_model["model"]
    assert model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    losses = [r["loss"] for r in read_log(out / "trainer_log.jsonl")[0] if r.get("loss") is not None]
    assert losses[-1] < losses[0], losses
    changed = [n for n, q in model.named_parameters() if q.requires_grad
               and not torch.equal(q.detach(), spy_model["before"][n])]
    assert changed and all("lora_" in n for n in changed)
