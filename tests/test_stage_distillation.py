"""Knowledge distillation on tiny random Llamas that share the committed tokenizer: the loss is the
formula (checked against torch ops written out here), masked positions do not count, the teacher
window is respected, a teacher with another vocabulary is refused clearly, and full / freeze / LoRA
students move towards the teacher through the Python API, the CLI and the web UI's runner."""
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TINY_TOKENIZER, build_tiny_model
from core import LLMTrainingParams, Project
from core.errors import ConfigError
from core.events import read_log, read_status
from core.stages import STAGES, common, distillation
from conftest import write_alpaca


def build_llama(out_dir: Path, tokenizer, vocab_size: int, seed: int = 2) -> Path:
    """A tiny Llama with a given tokenizer and embedding size (for vocabulary mismatches)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, data) -> Path:
    """Same tokenizer as the student, another seed, a wider body, and a brief SFT on the data (so it
    knows the answers the student is to learn): a teacher worth imitating."""
    root = tmp_path_factory.mktemp("teacher")
    base = build_tiny_model(root / "base", hidden=96, layers=2, seed=1)
    p = LLMTrainingParams(model=str(base), data_path=str(data), project_name=str(root / "sft"), trainer="sft",
                          chat_template="chatml", epochs=10, batch_size=3, gradient_accumulation=1, lr=5e-3,
                          warmup_ratio=0.0, log="none", eval_strategy="no", save_strategy="no")
    assert Project(p, process=False).create() == 0
    return root / "sft"

def dparams(student, teacher, data, out, **kw) -> LLMTrainingParams:
    base = dict(model=str(student), teacher_model=str(teacher), use_distillation=True, data_path=str(data),
                project_name=str(out), chat_template="chatml", epochs=8, batch_size=3, gradient_accumulation=1,
                lr=5e-3, warmup_ratio=0.0, logging_steps=1, log="none", eval_strategy="no",
                save_strategy="no", distill_temperature=3.0, distill_alpha=0.7)
    base.update(kw)
    return LLMTrainingParams(**base)

def first_batch(trainer, n: int = 3) -> dict:
    """Rows of different lengths, padded by the stage's collator (so padding is in the batch)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])

def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

def by_hand(student_logits, teacher_logits, labels, T, alpha, window=None):
    """The formula written out: alpha*T^2*KL(p_teacher^T || p_student^T) + (1-alpha)*CE, averaged per
    trained token; with a teacher window, KL only where the teacher saw the prefix."""
    targets = labels[:, 1:]
    mask = targets != -100
    s, t = student_logits[:, :-1], teacher_logits[:, :-1]
    n = mask.sum()
    ce = F.cross_entropy(s[mask], targets[mask], reduction="sum") / n
    kd_mask = mask.clone()
    if window is not None:
        kd_mask[:, window:] = False
    kl_per_pos = F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="none").sum(-1)
    kd = T * T * kl_per_pos[kd_mask].sum() / n
    return alpha * kd + (1 - alpha) * ce, kd, ce

def kl_to_teacher(student, teacher, batch) -> float:
    """Mean KL(teacher || student) at temperature 1 over the trained tokens of a batch."""
    mask = batch["labels"][:, 1:] != -100
    s, t = logits_of(student, batch)[:, :-1][mask], logits_of(teacher, batch)[:, :-1][mask]
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item()


# ---------------------------------------------------------------------------- wiring

def test_registered_and_flags_reach_the_trainer(tiny_model_dir, teacher_dir, data, tmp_path):
    assert "distillation" in STAGES
    assert STAGES["distillation"].data_kind == "sft"
    # --use-distillation with the default trainer selects the stage
    p = dparams(tiny_model_dir, teacher_dir, data, tmp_path / "o", trainer="default",
                distill_temperature=2.5, distill_alpha=0.4, distill_max_teacher_length=64)
    assert p.trainer == "distillation"
    trainer, tokenizer, template, has_eval = distillation.build_trainer(p, tmp_path / "o")
    assert isinstance(trainer, distillation.DistillationTrainer)
    assert (trainer.temperature, trainer.alpha, trainer.max_teacher_length) == (2.5, 0.4, 64)
    assert Path(trainer.teacher.name_or_path).resolve() == teacher_dir.resolve()
    assert trainer.teacher.config.hidden_size == 96 and trainer.model.config.hidden_size == 64
    assert not trainer.teacher.training
    assert not any(q.requires_grad for q in trainer.teacher.parameters())
    assert next(trainer.teacher.parameters()).dtype == next(trainer.model.parameters()).dtype
    assert next(trainer.teacher.parameters()).device == trainer.args.device
    assert trainer.teacher is not trainer.model and not has_eval and "<|im_start|>" in template
    # right padding whatever --padding says: the teacher's window is a column slice
    assert trainer.data_collator.tokenizer.padding_side == "right"


# ---------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("alpha", [0.7, 1.0, 0.0])
def test_loss_is_the_formula(alpha, tiny_model_dir, teacher_dir, data, tmp_path):
    p = dparams(tiny_model_dir, teacher_dir, data, tmp_path / "o", distill_alpha=alpha)
    trainer, *_ = distillation.build_trainer(p, tmp_path / "o")
    batch = first_batch(trainer)
    assert (batch["attention_mask"] == 0).any(), "the batch should hold padding"
    s, t = logits_of(trainer.model, batch), logits_of(trainer.teacher, batch)
    expected, kd, ce = by_hand(s, t, batch["labels"], 3.0, alpha)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    if alpha == 1.0:  # pure distillation: T^2 * KL, the labels play no part
        assert loss.item() == pytest.approx(kd.item(), abs=1e-5)
    if alpha == 0.0:  # pure CE: exactly the model's own causal-LM loss
        with torch.no_grad():
            own = trainer.model(**batch).loss
        assert loss.item() == pytest.approx(own.item(), abs=1e-5)
    # gradient accumulation: Trainer passes the trained-token count of the whole accumulated batch
    n = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        half = trainer.compute_loss(trainer.model, batch, num_items_in_batch=2 * n)
    assert half.item() == pytest.approx(expected.item() / 2, abs=1e-5)

def test_masked_positions_do_not_count(tiny_model_dir, teacher_dir, data, tmp_path, monkeypatch):
    p = dparams(tiny_model_dir, teacher_dir, data, tmp_path / "o")
    trainer, *_ = distillation.build_trainer(p, tmp_path / "o")
    batch = first_batch(trainer)
    real = trainer.teacher_logits(batch["input_ids"], batch["attention_mask"])
    # position t predicts token t+1: it is masked when labels[t+1] is -100 (prompt, padding) and the
    # last position predicts nothing
    masked = torch.ones(real.shape[:2], dtype=torch.bool)
    masked[:, :-1] = batch["labels"][:, 1:] == -100
    assert masked.any() and (~masked).any()
    noise = 50 * torch.randn_like(real)

    def loss_with(teacher_logits):
        monkeypatch.setattr(trainer, "teacher_logits", lambda ids, am: teacher_logits)
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    base = loss_with(real)
    assert loss_with(torch.where(masked[..., None], real + noise, real)) == pytest.approx(base, abs=1e-6)
    # the control: the same change at trained positions does move the loss
    assert abs(loss_with(torch.where(masked[..., None], real, real + noise)) - base) > 1e-2

def test_teacher_reads_only_its_window(tiny_model_dir, teacher_dir, data, tmp_path, monkeypatch):
    p = dparams(tiny_model_dir, teacher_dir, data, tmp_path / "o")
    trainer, *_ = distillation.build_trainer(p, tmp_path / "o")
    batch = first_batch(trainer)
    trained_cols = (batch["labels"][:, 1:] != -100).any(0).nonzero().flatten()
    window = int(trained_cols[0]) + 2  # some trained positions inside the window, the rest outside
    assert window < batch["input_ids"].shape[1] - 1
    trainer.max_teacher_length = window
    widths = []
    real_forward = trainer.teacher.forward
    monkeypatch.setattr(trainer.teacher, "forward",
                        lambda **kw: widths.append(kw["input_ids"].shape[1]) or real_forward(**kw))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert widths == [window]
    s, t = logits_of(trainer.model, batch), logits_of(trainer.teacher, batch)  # causal: same on the window
    expected, *_ = by_hand(s, t, batch["labels"], 3.0, 0.7, window=window)
    assert loss == pytest.approx(expected.item(), abs=1e-5)

def test_teacher_with_another_vocabulary_is_refused(tiny_model_dir, data, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    tok.add_tokens(["<tool_a>", "<tool_b>", "<tool_c>"])
    other = build_llama(tmp_path / "other-vocab", tok, vocab_size=len(tok))
    loaded = []
    monkeypatch.setattr(common, "load_trainable_model", lambda *a, **k: loaded.append(1))
    p = dparams(tiny_model_dir, other, data, tmp_path / "o")
    with pytest.raises(ConfigError) as err:
        distillation.build_trainer(p, tmp_path / "o")
    msg = str(err.value)
    assert str(tiny_model_dir) in msg and str(other) in msg
    assert "tokenizer" in msg and "589" in msg and "592" in msg and "Fix:" in msg and "<tool_a>" in msg
    assert not loaded, "refused before the student was loaded"
    # through the project: the pre-flight check refuses it before a run directory (or a process) exists
    with pytest.raises(ConfigError, match="different vocabularies"):
        Project(p, process=False).create()
    assert not (tmp_path / "o").exists()

def test_same_tokenizer_with_padded_embeddings_is_accepted(tiny_model_dir, tiny_tokenizer, data, tmp_path):
    padded = build_llama(tmp_path / "padded", tiny_tokenizer, vocab_size=len(tiny_tokenizer) + 15)
    p = dparams(tiny_model_dir, padded, data, tmp_path / "o")
    trainer, *_ = distillation.build_trainer(p, tmp_path / "o")
    batch = first_batch(trainer)
    s, t = logits_of(trainer.model, batch), logits_of(trainer.teacher, batch)
    assert t.shape[-1] == s.shape[-1] + 15
    expected, *_ = by_hand(s, t[..., : s.shape[-1]], batch["labels"], 3.0, 0.7)  # the shared ids
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------------------------------------------------------------------- training

@pytest.fixture
def spy_trainer(monkeypatch):
    """The trainer the stage builds, with the student's weights and its KL to the teacher on the
    first training batch taken before training (a spy around the real build_trainer)."""
    seen = {}
    real = distillation.build_trainer

    def spy(*a, **kw):
        built = real(*a, **kw)
        trainer = built[0]
        seen["trainer"] = trainer
        seen["batch"] = first_batch(trainer)
        seen["kl_before"] = kl_to_teacher(trainer.model, trainer.teacher, seen["batch"])
        seen["before"] = {n: q.detach().clone() for n, q in trainer.model.named_parameters()}
        return built

    monkeypatch.setattr(distillation, "build_trainer", spy)
    return seen


@pytest.mark.parametrize("method,alpha", [("full", 0.7), ("freeze", 0.7), ("lora", 0.7), ("full", 1.0)])
def test_student_moves_towards_the_teacher(method, alpha, tiny_model_dir, teacher_dir, data, tmp_path, spy_trainer):
    """alpha=1 is pure distillation: the labels play no part, the student still learns the teacher."""
    out = tmp_path / f"run-{method}"
    extra = dict(val_size=2, eval_strategy="epoch") if method == "lora" else {}
    p = dparams(tiny_model_dir, teacher_dir, data, out, finetuning_type=method, freeze_trainable_layers=1,
                distill_alpha=alpha, epochs=12, lr={"full": 5e-3, "freeze": 2e-2, "lora": 2e-2}[method], **extra)
    assert Project(p, process=False).create() == 0
    assert read_status(out)["state"] == "finished"

    trainer = spy_trainer["trainer"]
    kl_after = kl_to_teacher(trainer.model, trainer.teacher, spy_trainer["batch"])
    # measured: 7.6 -> 0.02 (full), 0.03 (pure KD), 0.17 (freeze), 0.03 (LoRA)
    assert kl_after < 0.1 * spy_trainer["kl_before"], (spy_trainer["kl_before"], kl_after)

    trainable = {n for n, q in trainer.model.named_parameters() if q.requires_grad}
    assert trainable
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(param.detach(), spy_trainer["before"][name])
        assert changed == (name in trainable), name
    if method == "lora":
        assert all("lora_" in n for n in trainable)
    # the teacher stayed frozen: its weights are still the ones on disk
    on_disk = load_file(str(teacher_dir / "model.safetensors"))
    for name, param in trainer.teacher.named_parameters():
        assert torch.equal(param.detach(), on_disk[name]), name

    records, _ = read_log(out / "trainer_log.jsonl")
    train = [r for r in records if r.get("loss") is not None]
    assert len(train) >= 10
    for r in train:  # every logging step carries the parts of the loss
        assert {"kd_loss", "ce_loss", "kl"} <= r.keys(), r
        assert r["loss"] == pytest.approx(alpha * r["kd_loss"] + (1 - alpha) * r["ce_loss"], rel=1e-3)
    assert train[-1]["kl"] < 0.5 * train[0]["kl"] and train[-1]["kd_loss"] < 0.5 * train[0]["kd_loss"]
    if method == "lora":
        evals = [r for r in records if r.get("eval_loss") is not None]
        assert evals and all({"eval_kd_loss", "eval_ce_loss", "eval_kl"} <= r.keys() for r in evals)
        assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    else:
        assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "README.md").is_file()
    assert "--trainer distillation" in (out / "README.md").read_text()

def test_cli_distills_in_a_subprocess(tiny_model_dir, teacher_dir, data, tmp_path):
    out = tmp_path / "cli-run"
    cmd = [shutil.which("aitraining"), "llm", "--train", "--model", str(tiny_model_dir),
           "--teacher-model", str(teacher_dir), "--use-distillation", "--distill-temperature", "3.0",
           "--distill-alpha", "0.5", "--data-path", str(data), "--project-name", str(out), "--peft",
           "--epochs", "1", "--batch-size", "2", "--gradient-accumulation", "1", "--logging-steps", "1",
           "--log", "none", "--chat-template", "chatml"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_status(out)["state"] == "finished"
    assert (out / "adapter_model.safetensors").is_file()
    from core import config_io

    saved = config_io.load(out / "config.yaml")
    assert (saved.trainer, saved.teacher_model, saved.distill_temperature, saved.distill_alpha) == \
        ("distillation", str(teacher_dir), 3.0, 0.5)
    records, _ = read_log(out / "trainer_log.jsonl")
    assert any("kd_loss" in r and "kl" in r for r in records)
    assert "temperature 3.00, alpha 0.50" in (out / "running.log").read_text()

def test_web_ui_runner_runs_distillation(tiny_model_dir, teacher_dir, data, tmp_path):
    from webui.runner import Runner

    root = tmp_path / "runs"
    p = dparams(tiny_model_dir, teacher_dir, data, root / "distill", finetuning_type="lora", epochs=2,
                lr=1e-2)
    run_dir = Runner(root).start(p)
    deadline = time.time() + 300
    while read_status(run_dir).get("state") in ("pending", "running", None) and time.time() < deadline:
        time.sleep(0.5)
    status = read_status(run_dir)
    assert status["state"] == "finished", (status, (run_dir / "console.log").read_text()[-3000:])
    assert status["stage"] == "distillation"
    records, _ = read_log(run_dir / "trainer_log.jsonl")
    assert [r for r in records if r.get("kd_loss") is not None]
    assert (run_dir / "adapter_model.safetensors").is_file()
