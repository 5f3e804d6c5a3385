"""PPO on a tiny random Llama: the math against hand-computed numbers (GAE, KL rewards, the clipped
losses), the flags reaching the loop, clear errors for a missing reward model or reward function,
and real runs: the mean reward of a rule reward rises (full and LoRA), checkpoints resume and a stop
request saves one, and runs through the CLI (with a reward model built here) and the web UI runner.

`reward` below is also the rule reward the runs use, imported by the training process as
"tests.test_stage_ppo:reward" (so this module imports nothing from conftest)."""
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import LLMTrainingParams, Project
from core.errors import ConfigError
from core.events import STOP, read_log, read_status
from core.stages import STAGES, ppo

QA = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
      ("Say hello in Portuguese.", "Olá!"), ("What colour is the sky?", "Blue."),
      ("Name a fruit.", "Apple."), ("What is the opposite of hot?", "Cold.")]
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny-tokenizer"
REWARD = "tests.test_stage_ppo:reward"


def reward(prompts, responses):
    """How often the answer says " an": a token the tiny random model samples now and then, so
    PPO has something to reinforce from the first batch on."""
    return [float((" " + r).count(" an")) for r in responses]


def write_alpaca(path: Path, repeat: int = 4) -> Path:
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA] * repeat
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("ppo-data") / "train.jsonl")


def pparams(model, data, out, **kw) -> LLMTrainingParams:
    base = dict(model=str(model), data_path=str(data), project_name=str(out), trainer="ppo",
                chat_template="chatml", rl_reward_fn=REWARD, epochs=1, batch_size=24, rl_mini_batch_size=12,
                rl_num_ppo_epochs=4, rl_max_new_tokens=6, rl_kl_coef=0.05, lr=1e-3, warmup_ratio=0.0,
                log="none", save_strategy="no")
    base.update(kw)
    return LLMTrainingParams(**base)


# ---------------------------------------------------------------------------- the math

def test_gae_matches_a_hand_computed_example():
    # one answer of 3 tokens and one of 2 (then padding); gamma 0.9, lambda 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 7.0]])   # 7.0 sits on padding: ignored
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])      # 9.0 too
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta_2 = 2 + 0 - 0.1 = 1.9;  delta_1 = 0 + 0.9*0.1 - 0.2 = -0.11;  delta_0 = 1 + 0.9*0.2 - 0.5 = 0.68
    #        A_2 = 1.9;  A_1 = -0.11 + 0.72*1.9 = 1.258;  A_0 = 0.68 + 0.72*1.258 = 1.58576
    # row 1: delta_1 = -1 + 0 - 0.4 = -1.4;  delta_0 = 0.5 + 0.9*0.4 - 0.3 = 0.56
    #        A_1 = -1.4;  A_0 = 0.56 + 0.72*(-1.4) = -0.448
    expected_adv = torch.tensor([[1.58576, 1.258, 1.9], [-0.448, -1.4, 0.0]])
    assert torch.allclose(adv, expected_adv, atol=1e-6), adv
    assert torch.allclose(ret, (expected_adv + values) * mask, atol=1e-6)
    # lambda = 1, gamma = 1: the advantage is the Monte Carlo return minus V
    adv1, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1[0], torch.tensor([3.0 - 0.5, 2.0 - 0.2, 2.0 - 0.1]))


def test_kl_penalized_rewards_put_the_score_on_the_last_answer_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ppo.kl_penalized_rewards(torch.tensor([10.0, -4.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 10.0], [-0.1, -4.0, 0.0]]))


def test_clipped_losses_match_hand_computed_values():
    eps, c = 0.2, 0.5
    # ratios exp(new - old): 1.5 (A>0: clipped to 1.2), 0.5 (A>0: unclipped 0.5 is worse, kept),
    # 1.5 (A<0: unclipped is worse, kept), 0.7 (A<0: clipped to 0.8), the last token is padding
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.7, 3.0]]))
    adv = torch.tensor([[1.0, 2.0, -1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old_v = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    new_v = torch.tensor([[1.0, 1.2, -0.2, 0.0, 4.0]])
    ret = torch.tensor([[2.0, 0.0, -1.0, 3.0, 0.0]])
    out = ppo.ppo_losses(new, old, adv, new_v, old_v, ret, mask, eps, c)
    # per token max(-A*r, -A*clip(r)): max(-1.5, -1.2) = -1.2; max(-1.0, -1.6) = -1.0;
    #                                  max(1.5, 1.2) = 1.5;   max(1.4, 1.6) = 1.6
    assert out["policy_loss"].item() == pytest.approx((-1.2 - 1.0 + 1.5 + 1.6) / 4, abs=1e-6)
    assert out["clipfrac"].item() == pytest.approx(2 / 4)  # tokens 0 and 3 were clipped
    # values: V_clip = old + clip(new - old, -0.5, 0.5) = [0.5, 1.2, -0.2, 0.0]
    # max((V - R)^2, (V_clip - R)^2): max(1, 2.25) = 2.25; max(1.44, 1.44) = 1.44;
    #                                 max(0.64, 0.64) = 0.64; max(9, 9) = 9
    assert out["value_loss"].item() == pytest.approx(0.5 * (2.25 + 1.44 + 0.64 + 9.0) / 4, abs=1e-6)
    assert out["value_clipfrac"].item() == pytest.approx(1 / 4)
    log_r = new[0, :4]
    assert out["approx_kl"].item() == pytest.approx(0.5 * (log_r ** 2).mean().item(), abs=1e-6)
    # the gradient flows through the clipped objective only where it is not clipped
    new_g = new.clone().requires_grad_(True)
    ppo.ppo_losses(new_g, old, adv, new_v, old_v, ret, mask, eps, c)["policy_loss"].backward()
    # d/dnew of -A*r/4 = -A*r/4 at tokens 1 and 2; 0 at the clipped tokens and the padding
    assert torch.allclose(new_g.grad, torch.tensor([[0.0, -2.0 * 0.5 / 4, 1.5 / 4, 0.0, 0.0]]), atol=1e-6)


def test_built_in_rewards():
    refs = ["Paris.", "Four."]
    assert ppo.correctness([], ["It is paris!", "five"], refs) == [1.0, 0.0]
    assert ppo.token_f1([], ["paris", "four or five"], refs) == [1.0, pytest.approx(0.5)]
    assert ppo.length_penalty([], ["", "one", "a b c"]) == [-1.0, 0.0, pytest.approx(-2 / 99)]
    assert ppo.resolve_reward_fn("default") is ppo.token_f1
    assert ppo.resolve_reward_fn(REWARD)([], ["an an", "no"]) == [2.0, 0.0]
    # a function that takes references gets them; one that does not, does not
    seen = {}

    def with_refs(prompts, responses, references):
        seen["refs"] = references
        return [0.0] * len(responses)

    ppo.call_reward_fn(with_refs, ["q"], ["a"], ["ref"], [[]])
    assert seen["refs"] == ["ref"]
    with pytest.raises(ConfigError, match="returned 1 scores for 2 responses"):
        ppo.call_reward_fn(lambda p, r: [1.0], ["q", "q"], ["a", "b"], ["", ""], [[], []])


def test_unknown_reward_function_is_a_clear_error():
    with pytest.raises(ConfigError, match="not a built-in reward.*length_penalty"):
        ppo.resolve_reward_fn("shortest")
    with pytest.raises(ConfigError, match="cannot import no_such_module_xyz"):
        ppo.resolve_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        ppo.resolve_reward_fn("tests.test_stage_ppo:nope")


def test_prompts_are_the_conversation_up_to_the_last_user_turn(tiny_tokenizer):
    from core.chat import prompt_ids
    from core.templates import load_template

    chatml = load_template("chatml").source
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]
    [p] = ppo.build_prompts([{"messages": msgs, "tools": None}], tiny_tokenizer, chatml, budget=512)
    assert p.messages == msgs[:3] and p.user == "Name a fruit." and p.reference == "Apple."
    assert p.ids == prompt_ids(tiny_tokenizer, msgs[:3], chatml)
    assert tiny_tokenizer.decode(p.ids).endswith("<|im_start|>assistant\n")
    [short] = ppo.build_prompts([{"messages": msgs, "tools": None}], tiny_tokenizer, chatml, budget=10)
    assert short.ids == p.ids[-10:]  # the beginning is cut, the generation prompt stays


# ---------------------------------------------------------------------------- wiring

def test_registered_and_flags_reach_the_loop(tiny_model_dir, data, tmp_path, monkeypatch):
    assert "ppo" in STAGES and STAGES["ppo"].data_kind == "sft"
    p = pparams(tiny_model_dir, data, tmp_path / "o", rl_clip_range=0.15, rl_value_clip_range=0.3,
                rl_gamma=0.9, rl_gae_lambda=0.7, rl_kl_coef=0.02, rl_value_loss_coef=0.4, rl_num_ppo_epochs=2,
                rl_mini_batch_size=5, batch_size=10, rl_max_new_tokens=5, rl_top_k=7, rl_top_p=0.8,
                rl_temperature=0.9, rl_chunk_size=4, max_grad_norm=0.5, lr=2e-4, model_ref=str(tiny_model_dir))
    trainer = ppo.build_trainer(p, tmp_path / "o")
    c = trainer.config
    assert (c.clip_range, c.value_clip_range, c.gamma, c.lam, c.kl_coef, c.vf_coef) == (0.15, 0.3, 0.9, 0.7, 0.02, 0.4)
    assert (c.num_ppo_epochs, c.mini_batch_size, c.batch_size, c.max_new_tokens) == (2, 5, 10, 5)
    assert (c.top_k, c.top_p, c.temperature, c.chunk_size, c.max_grad_norm, c.lr) == (7, 0.8, 0.9, 4, 0.5, 2e-4)
    assert trainer.total_steps == math.ceil(24 / 10) and trainer.reward_fn.__name__ == "reward"
    # --model-ref: a separate frozen model; the chatml end-of-turn token stops generation
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.policy
    assert not any(q.requires_grad for q in trainer.ref_model.parameters())
    assert trainer.tokenizer.convert_tokens_to_ids("<|im_end|>") in trainer.stop_ids

    seen = {"generate": [], "losses": [], "gae": []}
    real_generate, real_losses, real_gae = trainer.policy.generate, ppo.ppo_losses, ppo.gae
    monkeypatch.setattr(trainer.policy, "generate", lambda **kw: seen["generate"].append(kw) or real_generate(**kw))
    monkeypatch.setattr(ppo, "ppo_losses", lambda *a: seen["losses"].append(a) or real_losses(*a))
    monkeypatch.setattr(ppo, "gae", lambda *a, **kw: seen["gae"].append((a, kw)) or real_gae(*a, **kw))
    batch = trainer.rollout([trainer.prompts[i] for i in trainer.batch_indices(0)])
    stats = trainer.update(batch)
    [gen] = seen["generate"]
    assert (gen["top_k"], gen["top_p"], gen["temperature"], gen["max_new_tokens"], gen["do_sample"]) == \
        (7, 0.8, 0.9, 5, True)
    assert seen["gae"][0][0][3:] == (0.9, 0.7)
    assert len(seen["losses"]) == 2 * 2  # 2 PPO epochs x 2 mini-batches of 5
    assert all(a[-2:] == (0.15, 0.3) and a[0].shape[0] == 5 for a in seen["losses"])
    assert batch["input_ids"].shape[1] <= max(len(pr.ids) for pr in trainer.prompts) + 5
    assert set(stats) >= {"policy_loss", "value_loss", "clipfrac", "approx_kl", "loss"}


def test_missing_reward_model_path_is_a_clear_error(tiny_model_dir, data, tmp_path, monkeypatch):
    from core.stages import common

    loaded = []
    monkeypatch.setattr(common, "load_trainable_model", lambda *a, **k: loaded.append(1))
    p = pparams(tiny_model_dir, data, tmp_path / "o", rl_reward_fn=None, rl_reward_model_path=str(tmp_path / "no-rm"))
    with pytest.raises(ConfigError) as err:
        ppo.build_trainer(p, tmp_path / "o")
    msg = str(err.value)
    assert "--rl-reward-model-path" in msg and "no-rm" in msg and "--trainer reward" in msg
    assert not loaded, "refused before the policy was loaded"
    # the pre-flight check refuses it before a run directory (or a process) exists
    with pytest.raises(ConfigError, match="no such directory"):
        Project(p, process=False).create()
    assert not (tmp_path / "o").exists()
    # the schema wants some reward source
    with pytest.raises(ValueError, match="--rl-reward-model-path"):
        LLMTrainingParams(trainer="ppo")


# ---------------------------------------------------------------------------- training

@pytest.fixture
def spy_trainer(monkeypatch):
    """The PPOTrainer the stage builds and its trainable weights before training."""
    seen = {}
    real = ppo.build_trainer

    def spy(*a, **kw):
        trainer = real(*a, **kw)
        seen["trainer"] = trainer
        seen["before"] = {n: q.detach().clone() for n, q in trainer.policy.named_parameters()}
        return trainer

    monkeypatch.setattr(ppo, "build_trainer", spy)
    return seen


@pytest.mark.parametrize("method", ["full", "lora"])
def test_mean_reward_rises(method, tiny_model_dir, data, tmp_path, spy_trainer):
    out = tmp_path / f"run-{method}"
    p = pparams(tiny_model_dir, data, out, finetuning_type=method, max_steps=20,
                lr={"full": 1e-3, "lora": 5e-3}[method])
    assert Project(p, process=False).create() == 0
    assert read_status(out)["state"] == "finished"

    records, _ = read_log(out / "trainer_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print(f"{method}: mean reward of the first 4 iterations {first:.3f}, of the last 4 {last:.3f}", rewards)
    assert last > first + 0.3 and last > 2 * first, rewards
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert records[-1]["kl"] > 0.5  # ...and moved away from it
    for r in records:
        for key in ("step", "total_steps", "epoch", "loss", "lr", "elapsed", "remaining", "percentage", "reward",
                    "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "response_length"):
            assert key in r, (key, r)
        assert r["loss"] == pytest.approx(r["policy_loss"] + 1.0 * r["value_loss"], rel=1e-4, abs=1e-6)
    assert records[-1]["percentage"] == 100.0 and records[-1]["total_steps"] == 20

    trainer = spy_trainer["trainer"]
    trainable = {n for n, q in trainer.policy.named_parameters() if q.requires_grad}
    for name, param in trainer.policy.named_parameters():  # what trains moved, nothing else did
        assert (not torch.equal(param.detach(), spy_trainer["before"][name])) == (name in trainable), name
    if method == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        assert trainer.ref_model is None  # the reference is the base: the adapter switched off
        assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    else:
        on_disk = load_file(str(tiny_model_dir / "model.safetensors"))
        for name, q in trainer.ref_model.named_parameters():  # the frozen copy stayed the start model
            assert torch.equal(q.detach(), on_disk[name]), name
        assert (out / "model.safetensors").is_file()
    head = load_file(str(out / "value_head.safetensors"))
    assert head["summary.weight"].shape == (1, 64) and head["summary.weight"].abs().sum() > 0  # it trained
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text()).get("chat_template", "") or \
        "<|im_start|>" in (out / "chat_template.jinja").read_text()
    for name in ("loss.png", "README.md", "config.yaml", "running.log"):
        assert (out / name).is_file(), name
    assert read_status(out)["metrics"]["reward"] == rewards[-1]


def test_checkpoint_resumes_at_the_next_iteration(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    p = pparams(tiny_model_dir, data, out, finetuning_type="lora", lr=5e-3, max_steps=3, save_strategy="steps",
                save_steps=1, save_total_limit=2)
    assert Project(p, process=False).create() == 0
    assert sorted(x.name for x in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    ckpt = out / "checkpoint-3"
    for name in ("adapter_model.safetensors", "value_head.safetensors", "optimizer.pt", "rng_state.pth",
                 "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 3
    size = (out / "trainer_log.jsonl").stat().st_size

    p2 = p.model_copy(update={"max_steps": 5, "resume_from_checkpoint": "auto"})
    trainer = ppo.build_trainer(p2, out)
    trainer.load_checkpoint(ckpt)
    assert trainer.step == 3
    assert torch.equal(trainer.value_head.summary.weight.detach(), load_file(str(ckpt / "value_head.safetensors"))["summary.weight"])
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    lora = {n: q for n, q in trainer.policy.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved) and all(
        any(torch.equal(q.detach(), t) for t in saved.values()) for q in lora.values())
    assert trainer.optimizer.state_dict()["state"], "optimizer moments restored"

    assert Project(p2, process=False).create() == 0
    new, _ = read_log(out / "trainer_log.jsonl", size)
    assert [r["step"] for r in new] == [4, 5]
    assert (out / "checkpoint-5").is_dir()


def test_stop_request_saves_a_checkpoint_and_stops(tiny_model_dir, data, tmp_path, monkeypatch):
    real_update = ppo.PPOTrainer.update

    def update_then_stop(self, batch):
        stats = real_update(self, batch)
        if self.step == 1:  # during the second iteration: as SIGTERM would
            STOP.set()
        return stats

    monkeypatch.setattr(ppo.PPOTrainer, "update", update_then_stop)
    out = tmp_path / "run"
    p = pparams(tiny_model_dir, data, out, finetuning_type="lora", lr=5e-3, max_steps=6)
    try:
        assert Project(p, process=False).create() == 0
    finally:
        STOP.clear()
    assert read_status(out)["state"] == "aborted"
    records, _ = read_log(out / "trainer_log.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # no final save after a stop


def build_reward_model(out_dir: Path, seed: int = 3) -> Path:
    """A tiny random sequence classifier (one score) with the tiny tokenizer: what --trainer reward saves."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_reward_model_scores_the_rendered_conversation(tmp_path):
    from core.templates import encode_conversation, load_template

    rm_dir = build_reward_model(tmp_path / "rm")
    chatml = load_template("chatml").source
    scorer = ppo.RewardModelScorer(str(rm_dir), chatml, "cpu", chunk_size=1)
    msgs = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "What is two plus two?"}]]
    scores = scorer(msgs, ["Apple.", "Four, I think."])
    for m, answer, score in zip(msgs, ["Apple.", "Four, I think."], scores):
        ids, _ = encode_conversation(scorer.tokenizer, [*m, {"role": "assistant", "content": answer}], chatml)
        with torch.no_grad():
            alone = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(alone, abs=1e-5)  # padding in a batch changes nothing
    assert scores[0] != scores[1]


def test_cli_trains_with_a_reward_model_in_a_subprocess(tiny_model_dir, data, tmp_path):
    rm_dir = build_reward_model(tmp_path / "rm")
    out = tmp_path / "cli-run"
    cmd = [shutil.which("aitraining"), "llm", "--train", "--trainer", "ppo", "--model", str(tiny_model_dir),
           "--data-path", str(data), "--project-name", str(out), "--rl-reward-model-path", str(rm_dir),
           "--peft", "--epochs", "2", "--batch-size", "12", "--rl-mini-batch-size", "6", "--rl-max-new-tokens", "4",
           "--rl-clip-range", "0.1", "--lr", "1e-3", "--log", "none", "--chat-template", "chatml",
           "--save-strategy", "no"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_status(out)["state"] == "finished"
    records, _ = read_log(out / "trainer_log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["epoch"] == 2.0
    assert all(math.isfinite(r["reward"]) and r["reward"] != 0.0 for r in records)  # the model's scores
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()
    assert f"reward model {rm_dir}" in (out / "running.log").read_text()
    from core import config_io

    saved = config_io.load(out / "config.yaml")
    assert (saved.trainer, saved.rl_reward_model_path, saved.rl_clip_range) == ("ppo", str(rm_dir), 0.1)


def test_web_ui_runner_runs_ppo(tiny_model_dir, data, tmp_path):
    from webui.runner import Runner

    root = tmp_path / "runs"
    p = pparams(tiny_model_dir, data, root / "ppo", finetuning_type="lora", lr=5e-3, max_steps=3)
    run_dir = Runner(root).start(p)
    deadline = time.time() + 300
    while read_status(run_dir).get("state") in ("pending", "running", None) and time.time() < deadline:
        time.sleep(0.5)
    status = read_status(run_dir)
    assert status["state"] == "finished", (status, (run_dir / "console.log").read_text()[-3000:])
    assert status["stage"] == "ppo" and status["step"] == 3
    records, _ = read_log(run_dir / "trainer_log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all("reward" in r for r in records)
    assert (run_dir / "adapter_model.safetensors").is_file()
