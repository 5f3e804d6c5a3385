"""Reward modeling (--trainer reward) on a tiny random Llama and a toy set that is clearly
separable (the chosen answer always says "sunny", the rejected one "rainy"): pairwise accuracy on
the held-out validation pairs ends above 0.9, the saved model reloads with load_reward_model from
the run directory (and from its adapter) and scores chosen > rejected, the score head trains with
every method, flags reach TRL's RewardConfig, demo_preference trains from the CLI, and a run goes
through the web UI runner."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from core import LLMTrainingParams, Project
from core.errors import ConfigError, DataError
from core.events import read_log, read_status
from core.stages import STAGES, reward
from core.stages.reward import load_reward_model, reward_scores

TOPICS = ["the beach", "the park", "the hills", "the lake", "the city", "the farm", "the forest", "the coast",
          "the market", "the garden", "the harbour", "the valley", "the island", "the bridge", "the square",
          "the desert", "the meadow", "the river", "the campus", "the village"]

def pairs(topics=TOPICS):
    return [{"prompt": f"What is the weather at {t}?", "chosen": f"It is sunny at {t}.",
             "rejected": f"It is rainy at {t}."} for t in topics]

def write_pairs(path: Path, rows=None) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or pairs())), encoding="utf-8")
    return path

def base_params(tiny_model_dir, data, out, **kw):
    defaults = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer="reward",
                    chat_template="chatml", epochs=3, batch_size=4, gradient_accumulation=1, lr=1e-2,
                    warmup_ratio=0.0, logging_steps=1, log="none", eval_strategy="no", save_strategy="no")
    defaults.update(kw)
    return LLMTrainingParams(**defaults)

def conv(row, answer):
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[answer]}]

def test_reward_is_a_registered_stage():
    assert STAGES["reward"].data_kind == "preference"

def test_lora_reward_model_separates_and_reloads(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "train.jsonl")
    out = tmp_path / "rm"
    p = base_params(tiny_model_dir, data, out, peft=True, val_size=6, eval_strategy="epoch", epochs=3)
    untrained, *_ = reward.build_trainer(p, tmp_path / "untrained")
    before = untrained.evaluate()  # the random score head: loss ~0.5, a margin under 1
    assert Project(p, process=False).create() == 0
    status = read_status(out)
    assert status["state"] == "finished", status
    after = status["metrics"]
    assert after["eval_accuracy"] > 0.9, after
    assert after["eval_loss"] < 0.1 * before["eval_loss"] and after["eval_margin"] > before["eval_margin"] + 2
    records, _ = read_log(out / "trainer_log.jsonl")
    assert any("accuracy" in r for r in records) and any("eval_accuracy" in r for r in records)

    # layout: the run dir is the full reward model, the adapter beside it, merged/ the same files
    for d in (out, out / "merged"):
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file(), d
    assert (out / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] is not None
    assert len(cfg["id2label"]) == 1

    rows = pairs()
    scores = {}
    for path in (out, out / "merged", out / "adapter"):
        model, tok = load_reward_model(path)
        assert tok.chat_template and "<|im_start|>" in tok.chat_template  # trained rendering travels
        s = reward_scores(model, tok, [conv(r, k) for r in rows for k in ("chosen", "rejected")], batch_size=5)
        scores[path.name] = s
        chosen, rejected = s[0::2], s[1::2]
        assert (chosen > rejected).float().mean() > 0.9, (chosen, rejected)
    assert torch.allclose(scores[out.name], scores["adapter"], atol=1e-4)
    # the Export tab's merge of the reward adapter keeps the one-label score head
    from core.model.export import merge_adapter_dir

    exported = merge_adapter_dir(out / "adapter", tmp_path / "exported")
    model, tok = load_reward_model(exported)
    again = reward_scores(model, tok, [conv(r, k) for r in rows for k in ("chosen", "rejected")], batch_size=5)
    assert torch.allclose(again, scores[out.name], atol=1e-4)
    # one conversation alone scores as in a padded batch
    model, tok = load_reward_model(out)
    alone = reward_scores(model, tok, [conv(rows[0], "rejected")])
    assert alone.item() == pytest.approx(scores[out.name][1].item(), abs=1e-4)
    # PPO's scorer, given the run directory, reads the same scores: same renderer, same token
    from core.stages import ppo

    scorer = ppo.RewardModelScorer(str(out), None, "cpu", chunk_size=4)
    theirs = scorer([[{"role": "user", "content": r["prompt"]}] for r in rows[:4]], [r["chosen"] for r in rows[:4]])
    assert theirs == pytest.approx(scores[out.name][0:8:2].tolist(), abs=1e-4)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_score_head_trains_with_every_method(method, tiny_model_dir, tmp_path, spy_model):
    data = write_pairs(tmp_path / "train.jsonl", pairs()[:8])
    out = tmp_path / f"rm-{method}"
    p = base_params(tiny_model_dir, data, out, finetuning_type=method, freeze_trainable_layers=1, epochs=1,
                    lr=1e-3)
    assert Project(p, process=False).create() == 0
    model, before = spy_model["model"], spy_model["before"]
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert "score.weight" in trainable
    if method == "freeze":
        assert all(".layers.1." in n or n == "score.weight" for n in trainable), sorted(trainable)
    for name, param in model.named_parameters():
        assert (not torch.equal(param.detach(), before[name])) == (name in trainable), name
    model, _ = load_reward_model(out)
    assert torch.equal(model.score.weight, spy_model["model"].score.weight)

def test_flags_reach_the_reward_config(tiny_model_dir, tmp_path):
    from trl import RewardConfig

    data = write_pairs(tmp_path / "train.jsonl")
    p = base_params(tiny_model_dir, data, tmp_path / "rm", peft=True, lr=3e-4, block_size=100, batch_size=3,
                    val_size=4, eval_strategy="epoch", eval_batch_size=5)
    trainer, tok, template, has_eval = reward.build_trainer(p, tmp_path / "rm")
    a = trainer.args
    assert isinstance(a, RewardConfig)
    assert (a.learning_rate, a.max_length, a.per_device_train_batch_size, a.per_device_eval_batch_size) == \
        (3e-4, 100, 3, 5)
    assert a.activation_checkpointing is False and a.bf16 is False  # fp32 on this CPU, no recompute
    assert has_eval and len(trainer.eval_dataset) == 4
    assert "<|im_start|>" in tok.chat_template
    model = trainer.model
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    # every pair was rendered with the chat template, prompt then answer, eos last
    from core.templates import encode_conversation

    row = trainer.train_dataset[0]
    assert tok.decode(row["chosen_ids"]).startswith("<|im_start|>user\nWhat is the weather")
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
    first = next(r for r in pairs() if r["chosen"] in tok.decode(row["chosen_ids"]))
    assert row["chosen_ids"] == encode_conversation(tok, conv(first, "chosen"), "chatml")[0]
    # pairs longer than --block-size are skipped; none left is a data error, not an empty run
    lengths = sorted(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset)
    cut = lengths[len(lengths) // 2]
    short, *_ = reward.build_trainer(p.model_copy(update={"block_size": cut}), tmp_path / "rm")
    assert len(short.train_dataset) == sum(n <= cut for n in lengths) < len(lengths)
    with pytest.raises(DataError, match="every pair is longer than"):
        reward.build_trainer(p.model_copy(update={"block_size": lengths[0] - 1}), tmp_path / "rm")

def test_not_a_reward_model_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="not a reward model"):
        load_reward_model(tiny_model_dir)  # a causal LM: its score head would be random

def test_cli_trains_demo_preference(tiny_model_dir, tmp_path):
    out = tmp_path / "cli-rm"
    cmd = [shutil.which("aitraining"), "llm", "--train", "--trainer", "reward", "--model", str(tiny_model_dir),
           "--data-path", "demo_preference", "--project-name", str(out), "--peft", "--max-steps", "2",
           "--log", "none", "--chat-template", "chatml", "--batch-size", "2", "--gradient-accumulation", "1",
           "--no-merge-adapter"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_status(out)["state"] == "finished"
    assert (out / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "merged").exists()

def test_web_ui_runner_runs_reward(tiny_model_dir, tmp_path):
    from webui.runner import Runner

    data = write_pairs(tmp_path / "train.jsonl", pairs()[:8])
    out = tmp_path / "runs" / "ui-rm"
    run_dir = Runner(tmp_path / "runs").start(base_params(tiny_model_dir, data, out, epochs=1))
    deadline = time.time() + 240
    while read_status(run_dir).get("state") not in ("finished", "failed", "aborted"):
        assert time.time() < deadline, read_status(run_dir)
        time.sleep(0.5)
    assert read_status(run_dir)["state"] == "finished", (run_dir / "console.log").read_text()[-3000:]
    model, _ = load_reward_model(run_dir)
    assert model.config.num_labels == 1
