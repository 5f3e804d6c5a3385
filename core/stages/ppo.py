"""PPO (--trainer ppo): reinforcement learning from a reward, on the prompts of SFT data.

TRL no longer ships a PPO trainer, so the loop is written out here, top to bottom. One iteration
(one "step" of trainer_log.jsonl) does:

 1. Rollout. Take --batch-size prompts (each conversation up to its last user turn, rendered with
    the chat template and its generation prompt, exactly as chat renders it) and let the policy
    answer, sampling with --rl-temperature / --rl-top-k / --rl-top-p for at most
    --rl-max-new-tokens tokens. An answer ends at the template's end-of-turn token or the eos; that
    token belongs to the answer, so the policy also learns when to stop.
 2. Score. A reward model (--rl-reward-model-path: a sequence classifier saved by --trainer reward)
    reads prompt + answer rendered as a conversation and returns one number; or a reward function
    does (--rl-reward-fn: a built-in, see REWARD_FUNCTIONS, or "module:function"). Given both, the
    score is their sum; given only --model-ref, the built-in "default" reward is used.
 3. Per-token rewards. logp_t is the policy's log-probability of answer token t, ref_logp_t the
    frozen reference model's (--model-ref; with LoRA the same network with the adapter switched
    off; otherwise a frozen copy of the starting policy). Both read logits / --rl-temperature, the
    distribution the tokens were sampled from (before top-k/top-p). Each token earns

        r_t = -kl_coef * (logp_t - ref_logp_t)      (+ the score, on the answer's last token only)

    Summed over an answer, logp - ref_logp is a one-sample estimate of KL(policy || reference):
    the penalty keeps the policy where the reward is trustworthy (a reward model is only right
    near the text it was trained on) and keeps it fluent.
 4. Advantages (GAE, Schulman et al. 2016). A value head V (one nn.Linear on the policy's last
    hidden state) predicts the return from each position. Walking backwards over the answer,

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last token is 0: the episode ends)
        A_t     = delta_t + gamma * lambda * A_{t+1}
        R_t     = A_t + V_t                          (the value head's regression target)

    lambda (--rl-gae-lambda) trades bias (0: one-step TD error) for variance (1: the Monte Carlo
    return minus V). The advantages are then whitened over the batch (zero mean, unit variance),
    so the step size does not depend on the reward's scale.
 5. Update (Schulman et al. 2017). --rl-num-ppo-epochs passes over the batch in shuffled
    mini-batches of --rl-mini-batch-size; each mini-batch is one AdamW step (--lr, --weight-decay,
    --scheduler with --warmup-ratio, gradients clipped to --max-grad-norm) on

        ratio_t  = exp(logp_new_t - logp_old_t)
        L_policy = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))   eps = --rl-clip-range
        V_clip_t = V_old_t + clip(V_new_t - V_old_t, -c, c)                            c = --rl-value-clip-range
        L_value  = 0.5 * mean_t max((V_new_t - R_t)^2, (V_clip_t - R_t)^2)
        loss     = L_policy + --rl-value-loss-coef * L_value

    The max of the clipped and unclipped terms is a pessimistic bound: once a token's probability
    has moved eps away from the one that sampled it, pushing it further earns nothing, so several
    epochs over one batch stay close to on-policy. Means are over the answer tokens of the
    mini-batch. Dropout is off throughout, so the first ratio is exactly 1.

The value head reads the hidden state detached: it learns from the policy's features without
pushing on them, so the language model moves only for the policy loss (a value loss large early
in training cannot wreck the model it sits on). It is saved beside the policy.

Schedule: ceil(prompts / --batch-size) iterations per epoch, --epochs epochs, or --max-steps
iterations when > 0. The prompts are shuffled each epoch (seeded by --seed and the epoch, so a
resumed run sees the same order). --gradient-accumulation is not used: a mini-batch is one step.
--rl-chunk-size caps the sequences per no-grad forward pass of the rollout (a memory knob).

Logged every iteration (trainer_log.jsonl, next to step/total_steps/epoch/loss/lr/elapsed/
remaining/percentage): reward (mean score), reward_std, kl (mean over answers of
sum_t logp_t - ref_logp_t), non_score_reward (mean over answers of the summed KL penalty),
entropy (mean per answer token), policy_loss, value_loss, clipfrac (share of tokens whose ratio
was clipped), value_clipfrac, approx_kl (0.5 * mean (logp_new - logp_old)^2, how far the updates
moved the policy), response_length; loss is policy_loss + vf_coef * value_loss. All losses are
means over the iteration's mini-batch steps.

Checkpoints (every --save-steps iterations with --save-strategy steps, every epoch with epoch,
and always when a run is stopped), in <run>/checkpoint-N/:
    the policy as save_pretrained writes it (adapter_model.safetensors for LoRA, else model weights),
    tokenizer files, value_head.safetensors, optimizer.pt ({"optimizer", "scheduler"} state dicts),
    rng_state.pth (torch and python generator states), trainer_state.json ({"global_step", ...}).
--resume-from-checkpoint auto (or a checkpoint-N path) loads all of it and continues at N + 1.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import checkpoints
from core.checkpoints import repair_log
from core.errors import ConfigError
from core.events import LOG_FILE, PLOT_EVERY_S, STOP, plot_loss, read_log, write_status
from core.params import LLMTrainingParams
from core.stages import common

log = logging.getLogger("aitraining")

VALUE_HEAD_FILE = "value_head.safetensors"


# ================================================================== the math (pure functions)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits): (B, T, V), (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: log Z - sum p * logit."""
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl) per answer token: r_t = -kl_coef * (logp_t - ref_logp_t), plus the sequence's
    score on its last answer token. mask (B, T) is 1 on answer tokens (a prefix of each row)."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of each answer's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over answers that are a prefix of each row (mask 1).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, R_t = A_t + V_t.
    Past the answer, r and V count as 0, so the value after the last token is 0 and the padding
    adds nothing. Returns (advantages, returns), 0 outside the mask.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float, value_clip_range: float) -> dict[str, torch.Tensor]:
    """The clipped surrogate policy loss and the clipped value loss (module docstring, step 5),
    means over the answer tokens; plus clipfrac, value_clipfrac and approx_kl (no gradient)."""
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = masked_mean(torch.max(pg_unclipped, pg_clipped), mask)

    v_clipped = old_values + torch.clamp(new_values - old_values, -value_clip_range, value_clip_range)
    vf_unclipped = (new_values - returns) ** 2
    vf_clipped = (v_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_clipped > pg_unclipped).float(), mask)
        value_clipfrac = masked_mean((vf_clipped > vf_unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return {"policy_loss": policy_loss, "value_loss": value_loss, "clipfrac": clipfrac,
            "value_clipfrac": value_clipfrac, "approx_kl": approx_kl}


# ================================================================== rewards

def _normalize_text(s: str) -> str:
    s = s.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(s.split())


def length_penalty(prompts: list[str], responses: list[str]) -> list[float]:
    """Brevity: 0 for an answer of one word, falling linearly to -1 at 100 words and beyond; an
    empty answer gets -1 too (saying nothing is not the shortest good answer)."""
    out = []
    for r in responses:
        words = len(r.split())
        out.append(-1.0 if words == 0 else -min(words - 1, 99) / 99.0)
    return out


def correctness(prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
    """1.0 when the data's reference answer (the conversation's last assistant message) appears in
    the answer, compared without case, punctuation or extra spaces; else 0.0."""
    out = []
    for r, ref in zip(responses, references):
        ref_n = _normalize_text(ref)
        out.append(1.0 if ref_n and ref_n in _normalize_text(r) else 0.0)
    return out


def token_f1(prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
    """Word-overlap F1 between the answer and the data's reference answer, in [0, 1]: a graded
    version of correctness (partial answers earn partial reward)."""
    out = []
    for r, ref in zip(responses, references):
        a, b = _normalize_text(r).split(), _normalize_text(ref).split()
        common_words = sum((Counter(a) & Counter(b)).values())
        if not a or not b or not common_words:
            out.append(0.0)
            continue
        precision, recall = common_words / len(a), common_words / len(b)
        out.append(2 * precision * recall / (precision + recall))
    return out


# --rl-reward-fn built-ins. Every reward function is called as fn(prompts, responses) and may also
# take `references` (the data's answers) and `messages` (each prompt as a list of chat messages)
# as keyword arguments; it returns one float per response. prompts are the last user messages.
REWARD_FUNCTIONS: dict[str, Callable] = {
    "default": token_f1,
    "length_penalty": length_penalty,
    "correctness": correctness,
}


def resolve_reward_fn(spec: str) -> Callable:
    """A built-in name, "package.module:function", or "path/to/file.py:function"."""
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    fix = (f"use one of {', '.join(REWARD_FUNCTIONS)} or 'module:function' (a function taking "
           "(prompts, responses) and returning one float per response)")
    if ":" not in spec:
        raise ConfigError(f"--rl-reward-fn {spec!r} is not a built-in reward. Fix: {fix}")
    module_name, func_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"--rl-reward-fn {spec}: no file {path}. Fix: {fix}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a module next to where the command runs
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--rl-reward-fn {spec}: cannot import {module_name} ({type(e).__name__}: {e}). "
                          f"Fix: {fix}; the module must be importable from the working directory or "
                          "PYTHONPATH") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"--rl-reward-fn {spec}: {module_name} has no function {func_name!r}. Fix: {fix}")
    return fn


def call_reward_fn(fn: Callable, prompts: list[str], responses: list[str], references: list[str],
                   messages: list[list[dict]]) -> list[float]:
    """fn(prompts, responses[, references=..., messages=...]) -> a float per response, checked."""
    try:
        params = inspect.signature(fn).parameters
        takes_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_kw = {}, False
    extra = {k: v for k, v in (("references", references), ("messages", messages)) if takes_kw or k in params}
    scores = list(fn(prompts, responses, **extra))
    name = getattr(fn, "__name__", str(fn))
    if len(scores) != len(responses):
        raise ConfigError(f"reward function {name} returned {len(scores)} scores for {len(responses)} "
                          "responses. Fix: return one float per response")
    try:
        return [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward function {name} returned a non-number ({e}). Fix: return floats") from e


def load_reward_model(path):
    """(model, tokenizer) of a reward model directory: the reward stage's loader when present
    (it knows every layout --trainer reward writes), else a full sequence-classification model."""
    try:
        from core.stages.reward import load_reward_model as from_reward_stage
    except ImportError:
        from_reward_stage = None
    if from_reward_stage is not None:
        return from_reward_stage(path)
    from transformers import AutoModelForSequenceClassification

    from core.model.loader import load_tokenizer

    src = Path(path)
    if not (src / "config.json").is_file() and (src / "merged" / "config.json").is_file():
        src = src / "merged"  # a LoRA reward run: its merged model
    model = AutoModelForSequenceClassification.from_pretrained(src, dtype=torch.float32)
    return model, load_tokenizer(src)


class RewardModelScorer:
    """Scores (prompt messages, answer) pairs with a sequence-classification reward model: the
    conversation with the answer as its last assistant turn, rendered with the reward model's own
    chat template (the policy's when it has none), as reward training renders it."""

    def __init__(self, path: str, policy_template: Optional[str], device, chunk_size: int):
        from core.templates import _own_template

        self.model, self.tokenizer = load_reward_model(path)
        self.model.to(device).eval().requires_grad_(False)
        self.template = _own_template(self.tokenizer) or policy_template
        self.device, self.chunk_size = device, chunk_size

    @torch.no_grad()
    def __call__(self, messages: list[list[dict]], responses: list[str]) -> list[float]:
        from core.templates import encode_conversation

        pad = self.tokenizer.pad_token_id
        rows = [encode_conversation(self.tokenizer, [*m, {"role": "assistant", "content": r}], self.template)[0]
                for m, r in zip(messages, responses)]
        scores = []
        for i in range(0, len(rows), self.chunk_size):
            chunk = rows[i:i + self.chunk_size]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=self.device)
            scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


# ================================================================== model pieces

class ValueHead(nn.Module):
    """V(state): one linear layer on the last hidden state, starting at 0 for every state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probabilities of the same tokens computed twice: dropout would make the
    ratio noisy (it is not 1 even before any update)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def forward_answers(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float, value_head: Optional[ValueHead] = None, with_entropy: bool = False):
    """Run model on [left-padded prompt | right-padded answer] rows -> per answer token:
    logp (B, T), values (B, T) or None, entropy (B, T) or None.

    The logits at position i predict token i + 1, so the answer tokens (columns prompt_len..)
    are read from positions prompt_len - 1 .. -2, and the value of the state before each answer
    token from the same positions. Position ids skip the left padding, as generate() does.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, output_hidden_states=value_head is not None)
    logits = out.logits[:, prompt_len - 1:-1].float() / temperature
    logp = logprobs_of(logits, input_ids[:, prompt_len:])
    values = value_head(out.hidden_states[-1][:, prompt_len - 1:-1].detach()) if value_head is not None else None
    entropy = entropy_of(logits) if with_entropy else None
    return logp, values, entropy


# ================================================================== configuration

@dataclass
class PPOConfig:
    """Everything the loop reads, taken from the schema by from_params (one place)."""

    batch_size: int          # prompts per rollout (--batch-size)
    mini_batch_size: int     # sequences per optimizer step (--rl-mini-batch-size)
    num_ppo_epochs: int      # passes over each rollout (--rl-num-ppo-epochs)
    gamma: float             # --rl-gamma
    lam: float               # --rl-gae-lambda
    kl_coef: float           # --rl-kl-coef
    vf_coef: float           # --rl-value-loss-coef
    clip_range: float        # --rl-clip-range
    value_clip_range: float  # --rl-value-clip-range
    max_new_tokens: int      # --rl-max-new-tokens
    top_k: int               # --rl-top-k (0: off)
    top_p: float             # --rl-top-p
    temperature: float       # --rl-temperature
    chunk_size: int          # --rl-chunk-size: sequences per no-grad forward pass
    lr: float
    weight_decay: float
    max_grad_norm: float
    scheduler: str
    warmup_ratio: float
    epochs: int
    max_steps: int
    seed: int
    save_strategy: str
    save_steps: int
    save_total_limit: int

    @classmethod
    def from_params(cls, p: LLMTrainingParams) -> "PPOConfig":
        return cls(batch_size=p.batch_size, mini_batch_size=min(p.rl_mini_batch_size, p.batch_size),
                   num_ppo_epochs=p.rl_num_ppo_epochs, gamma=p.rl_gamma, lam=p.rl_gae_lambda,
                   kl_coef=p.rl_kl_coef, vf_coef=p.rl_value_loss_coef, clip_range=p.rl_clip_range,
                   value_clip_range=p.rl_value_clip_range, max_new_tokens=p.rl_max_new_tokens,
                   top_k=p.rl_top_k, top_p=p.rl_top_p, temperature=p.rl_temperature,
                   chunk_size=p.rl_chunk_size, lr=p.lr, weight_decay=p.weight_decay,
                   max_grad_norm=p.max_grad_norm, scheduler=p.scheduler, warmup_ratio=p.warmup_ratio,
                   epochs=p.epochs, max_steps=p.max_steps, seed=p.seed, save_strategy=p.save_strategy,
                   save_steps=p.save_steps, save_total_limit=p.save_total_limit)


@dataclass
class Prompt:
    messages: list[dict]   # the conversation up to its last user turn
    ids: list[int]         # rendered with the template + generation prompt, tokenized
    user: str              # the last user message (what reward functions get as the prompt)
    reference: str         # the data's answer to it ("" when there is none)


def build_prompts(records: list[dict], tokenizer, template: Optional[str], budget: int) -> list[Prompt]:
    """SFT records -> prompts: each conversation cut before the answer to its last user turn;
    a plain-text record is a prompt as a whole. Longer prompts keep their last `budget` tokens."""
    from core.chat import prompt_ids

    prompts, cut = [], 0
    for rec in records:
        if "messages" in rec:
            msgs = rec["messages"]
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if not users:
                continue
            last = users[-1]
            messages = msgs[:last + 1]
            after = msgs[last + 1] if last + 1 < len(msgs) else None
            user, reference = msgs[last]["content"], after["content"] if after and after["role"] == "assistant" else ""
        else:
            messages, user, reference = [{"role": "user", "content": rec["text"]}], rec["text"], ""
        ids = prompt_ids(tokenizer, messages, template) if "messages" in rec or template else \
            tokenizer.encode(rec["text"], add_special_tokens=True)
        if len(ids) > budget:
            bos = [ids[0]] if ids[0] == tokenizer.bos_token_id else []
            ids, cut = bos + ids[len(ids) - budget + len(bos):], cut + 1
        prompts.append(Prompt(messages, ids, str(user), str(reference or "")))
    if cut:
        log.warning("%d prompts were longer than %d tokens (the context minus --rl-max-new-tokens); "
                    "their beginnings were cut", cut, budget)
    if not prompts:
        raise ConfigError("PPO found no prompt in the data: it needs conversations with a user turn "
                          "(or instruction/input columns). Fix: check --data-path and the column mapping")
    return prompts


# ================================================================== the trainer

class PPOTrainer:
    """The loop of the module docstring. Built by build_trainer; train() runs it."""

    def __init__(self, *, policy, value_head: ValueHead, ref_model, tokenizer, template: Optional[str],
                 prompts: list[Prompt], config: PPOConfig, run_dir: Path, stop_ids: list[int],
                 reward_model: Optional[RewardModelScorer] = None, reward_fn: Optional[Callable] = None,
                 report_to: tuple[str, ...] = (), device="cpu"):
        from transformers import get_scheduler

        self.policy, self.value_head, self.ref_model = policy, value_head, ref_model
        self.tokenizer, self.template, self.prompts = tokenizer, template, prompts
        self.config, self.run_dir, self.stop_ids = config, Path(run_dir), stop_ids
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self.report_to, self.device = report_to, device
        from core.templates import _stop_words

        self.stop_words = _stop_words(template) if template else []  # multi-token ones: cut as text
        c = config
        self.steps_per_epoch = math.ceil(len(prompts) / c.batch_size)
        self.total_steps = c.max_steps if c.max_steps > 0 else self.steps_per_epoch * c.epochs
        self.step = 0  # iterations done
        trainable = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
        self.optimizer = torch.optim.AdamW(trainable, lr=c.lr, weight_decay=c.weight_decay)
        updates = sum(c.num_ppo_epochs * math.ceil(len(self.batch_indices(s)) / c.mini_batch_size)
                      for s in range(self.total_steps))
        try:
            self.scheduler = get_scheduler(c.scheduler, self.optimizer,
                                           num_warmup_steps=math.ceil(c.warmup_ratio * updates),
                                           num_training_steps=updates)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--scheduler {c.scheduler}: {e}. Fix: use linear, cosine or constant") from e
        self._tb = None

    # -------------------------------------------------------------- data order
    def batch_indices(self, step: int) -> list[int]:
        """The prompts of iteration `step` (0-based): epoch e's shuffled order, cut in batches."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        return order[k * self.config.batch_size:(k + 1) * self.config.batch_size].tolist()

    # -------------------------------------------------------------- 1-4: rollout, score, rewards, GAE
    @torch.no_grad()
    def rollout(self, prompts: list[Prompt]) -> dict:
        c, tok = self.config, self.tokenizer
        pad = tok.pad_token_id
        self.policy.eval()
        width = max(len(p.ids) for p in prompts)  # prompts padded on the left, answers on the right
        query = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in prompts], device=self.device)
        query_mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts],
                                  device=self.device)
        out = self.policy.generate(
            input_ids=query, attention_mask=query_mask, do_sample=True, max_new_tokens=c.max_new_tokens,
            top_k=c.top_k, top_p=c.top_p, temperature=c.temperature, eos_token_id=self.stop_ids,
            pad_token_id=pad, use_cache=True)
        answers = out[:, width:]
        # an answer runs to its first stop token (included); generate pads after it
        is_stop = torch.isin(answers, torch.tensor(self.stop_ids, device=self.device))
        first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), answers.shape[1] - 1)
        mask = (torch.arange(answers.shape[1], device=self.device)[None] <= first_stop[:, None]).long()
        answers = answers.masked_fill(mask == 0, pad)
        input_ids, attention_mask = torch.cat([query, answers], 1), torch.cat([query_mask, mask], 1)

        logp, values, entropy, ref_logp = [], [], [], []
        for i in range(0, len(prompts), c.chunk_size):
            rows = slice(i, i + c.chunk_size)
            lp, v, ent = forward_answers(self.policy, input_ids[rows], attention_mask[rows], width,
                                         c.temperature, self.value_head, with_entropy=True)
            logp.append(lp), values.append(v), entropy.append(ent)
            ref_logp.append(self.reference_logp(input_ids[rows], attention_mask[rows], width))
        logp, values, entropy, ref_logp = (torch.cat(x) for x in (logp, values, entropy, ref_logp))
        mask_f = mask.float()

        texts = self.decode(answers, mask)
        scores = torch.tensor(self.score(prompts, texts), device=self.device, dtype=torch.float32)
        rewards, kl = kl_penalized_rewards(scores, logp, ref_logp, mask_f, c.kl_coef)
        advantages, returns = gae(rewards, values * mask_f, mask_f, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask_f)
        return dict(input_ids=input_ids, attention_mask=attention_mask, prompt_len=width, mask=mask_f,
                    logp=logp * mask_f, values=values * mask_f, advantages=advantages, returns=returns,
                    scores=scores, kl=kl, entropy=entropy, texts=texts, rewards=rewards)

    def reference_logp(self, input_ids, attention_mask, prompt_len) -> torch.Tensor:
        if self.ref_model is not None:
            return forward_answers(self.ref_model, input_ids, attention_mask, prompt_len, self.config.temperature)[0]
        with self.policy.disable_adapter():  # LoRA: the base model is the reference
            return forward_answers(self.policy, input_ids, attention_mask, prompt_len, self.config.temperature)[0]

    def decode(self, answers: torch.Tensor, mask: torch.Tensor) -> list[str]:
        from core.chat import clean_reply

        texts = []
        for row, m in zip(answers.tolist(), mask.tolist()):
            ids = [t for t, keep in zip(row, m) if keep and t not in self.stop_ids]
            texts.append(clean_reply(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop_words).strip())
        return texts

    def score(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        scores = [0.0] * len(texts)
        if self.reward_model is not None:
            scores = self.reward_model([p.messages for p in prompts], texts)
        if self.reward_fn is not None:
            extra = call_reward_fn(self.reward_fn, [p.user for p in prompts], texts,
                                   [p.reference for p in prompts], [p.messages for p in prompts])
            scores = [a + b for a, b in zip(scores, extra)]
        return scores

    # -------------------------------------------------------------- 5: the PPO update
    def update(self, batch: dict) -> dict[str, float]:
        c = self.config
        self.policy.train()  # dropout is off (disable_dropout); train() lets checkpointing work
        sums: dict[str, float] = defaultdict(float)
        n = 0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for _ in range(c.num_ppo_epochs):
            order = torch.randperm(len(batch["scores"]))
            for i in range(0, len(order), c.mini_batch_size):
                rows = order[i:i + c.mini_batch_size].to(self.device)
                new_logp, new_values, _ = forward_answers(
                    self.policy, batch["input_ids"][rows], batch["attention_mask"][rows], batch["prompt_len"],
                    c.temperature, self.value_head)
                losses = ppo_losses(new_logp, batch["logp"][rows], batch["advantages"][rows], new_values,
                                    batch["values"][rows], batch["returns"][rows], batch["mask"][rows],
                                    c.clip_range, c.value_clip_range)
                loss = losses["policy_loss"] + c.vf_coef * losses["value_loss"]
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm) if c.max_grad_norm > 0 \
                    else torch.tensor(0.0)
                self.optimizer.step()
                self.scheduler.step()
                for k, v in losses.items():
                    sums[k] += float(v.detach())
                sums["loss"] += float(loss.detach())
                sums["grad_norm"] += float(grad_norm)
                n += 1
                if STOP.is_set():  # stop between steps; the iteration counts as done
                    return {k: v / n for k, v in sums.items()}
        self.policy.eval()
        return {k: v / max(n, 1) for k, v in sums.items()}

    # -------------------------------------------------------------- the loop
    def train(self, resume_from: Optional[str] = None) -> dict:
        c = self.config
        if resume_from:
            self.load_checkpoint(Path(resume_from))
        start_step = self.step
        write_status(self.run_dir, "running", stage="ppo", step=self.step, total_steps=self.total_steps,
                     pid=os.getpid())
        log.info("PPO: %d prompts, %d iterations of %d prompts (%d per epoch), %d PPO epochs over "
                 "mini-batches of %d", len(self.prompts), self.total_steps, c.batch_size, self.steps_per_epoch,
                 c.num_ppo_epochs, c.mini_batch_size)
        repair_log(self.run_dir / LOG_FILE, upto_step=self.step)  # drop a torn line and steps redone now
        records, _ = read_log(self.run_dir / LOG_FILE)  # a resumed run keeps its curve
        started, last_plot, first_reward, stats = time.time(), 0.0, None, {}
        while self.step < self.total_steps:
            batch = self.rollout([self.prompts[i] for i in self.batch_indices(self.step)])
            stats = self.update(batch) if not STOP.is_set() else {}
            self.step += 1
            record = self.log_record(batch, stats, started, start_step)
            first_reward = record["reward"] if first_reward is None else first_reward
            records.append(record)
            if time.time() - last_plot > PLOT_EVERY_S:
                plot_loss(self.run_dir, records)
                last_plot = time.time()
            if STOP.is_set() or self.should_save():
                self.save_checkpoint()
            if STOP.is_set():
                log.warning("PPO stopped at iteration %d of %d", self.step, self.total_steps)
                break
        plot_loss(self.run_dir, records)
        if self._tb is not None:
            self._tb.close()
        if "wandb" in self.report_to:
            import wandb

            wandb.finish()
        last = records[-1] if records else {}
        return {"train_runtime": round(time.time() - started, 2), "global_step": self.step,
                "reward": last.get("reward"), "first_reward": first_reward, "kl": last.get("kl"),
                "train_loss": last.get("loss")}

    def should_save(self) -> bool:
        c = self.config
        if c.save_strategy == "steps":
            return self.step % c.save_steps == 0
        if c.save_strategy == "epoch":
            return self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
        return False

    def log_record(self, batch: dict, stats: dict, started: float, start_step: int) -> dict:
        now = time.time()
        elapsed = now - started
        rate = (self.step - start_step) / elapsed if elapsed > 0 else None
        mask = batch["mask"]
        record = {
            "step": self.step, "total_steps": self.total_steps,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": stats.get("loss"), "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": stats.get("grad_norm"),
            "elapsed": round(elapsed, 2),
            "remaining": round((self.total_steps - self.step) / rate, 2) if rate else None,
            "percentage": round(100.0 * self.step / self.total_steps, 2),
            "reward": batch["scores"].mean().item(),
            "reward_std": batch["scores"].std().item() if len(batch["scores"]) > 1 else 0.0,
            "kl": batch["kl"].sum(1).mean().item(),
            "non_score_reward": (-self.config.kl_coef * batch["kl"].sum(1)).mean().item(),
            "entropy": masked_mean(batch["entropy"], mask).item(),
            "response_length": mask.sum(1).mean().item(),
            **{k: stats[k] for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl")
               if k in stats},
        }
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        write_status(self.run_dir, step=self.step, total_steps=self.total_steps,
                     **({"loss": record["loss"]} if record["loss"] is not None else {}), reward=record["reward"])
        log.info("iteration %d/%d: reward %.4f, kl %.4f, loss %s, sample %r", self.step, self.total_steps,
                 record["reward"], record["kl"], record["loss"], batch["texts"][0][:80])
        self.report(record)
        return record

    def report(self, record: dict) -> None:
        """--log tensorboard / wandb: the same numbers as the jsonl line."""
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "total_steps")}
        if "tensorboard" in self.report_to:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "runs"))
            for k, v in numbers.items():
                self._tb.add_scalar(f"train/{k}", v, self.step)
            self._tb.flush()
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is None:
                wandb.init(project="aitraining", name=self.run_dir.name, dir=str(self.run_dir))
            wandb.log(numbers, step=self.step)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoint-N/: policy (save_pretrained), value head, optimizer + scheduler, RNG, state."""
        from safetensors.torch import save_file

        out = self.run_dir / f"checkpoint-{self.step}"
        tmp = self.run_dir / f".checkpoint-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.policy.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(tmp / VALUE_HEAD_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "rng_state.pth")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"global_step": self.step, "max_steps": self.total_steps, "epoch": self.step / self.steps_per_epoch,
             "trainer": "ppo", "config": asdict(self.config)}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        # keep the newest --save-total-limit checkpoints
        done = sorted((p for p in self.run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-self.config.save_total_limit]:
            checkpoints.remove(old)  # rename, then delete: never half-deleted under its name
        write_status(self.run_dir, last_checkpoint=str(out))
        log.info("saved %s", out)
        return out

    def load_checkpoint(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        from core.model.export import is_peft_model

        state = json.loads((ckpt / "trainer_state.json").read_text())
        if is_peft_model(self.policy):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy, load_file(str(ckpt / "adapter_model.safetensors")))
        else:
            weights = {}
            for f in sorted(ckpt.glob("model*.safetensors")):
                weights.update(load_file(str(f)))
            if not weights:
                raise ConfigError(f"{ckpt} holds no model weights (model*.safetensors). Fix: resume from a "
                                  "checkpoint of a full or freeze PPO run, or start fresh")
            missing, unexpected = self.policy.load_state_dict(weights, strict=False)
            trainable_missing = [n for n, p in self.policy.named_parameters() if p.requires_grad and n in missing]
            if unexpected or trainable_missing:
                raise ConfigError(f"{ckpt} does not match this model (unexpected {unexpected[:3]}, missing "
                                  f"{trainable_missing[:3]}). Fix: resume with the run's own --model and method")
        self.value_head.load_state_dict(load_file(str(ckpt / VALUE_HEAD_FILE)))
        opt = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        rng = torch.load(ckpt / "rng_state.pth", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["global_step"])
        log.info("resumed PPO from %s at iteration %d", ckpt, self.step)


# ================================================================== building and running

def check_reward_source(params: LLMTrainingParams) -> None:
    """Before any model loads: the reward model path exists, the reward function imports."""
    path = params.rl_reward_model_path
    if path and not Path(path).expanduser().is_dir():
        raise ConfigError(f"--rl-reward-model-path {path}: no such directory. Fix: train a reward model "
                          "first (aitraining llm --train --trainer reward ...) and pass its run directory, "
                          "or use --rl-reward-fn for a rule-based reward")


def build_trainer(params: LLMTrainingParams, run_dir: Path) -> PPOTrainer:
    """Everything configured, nothing trained yet."""
    from transformers import set_seed

    from core.model.export import is_peft_model
    from core.model.loader import load_for_inference
    from core.templates import stop_token_ids

    set_seed(params.seed)
    run_dir = Path(run_dir)
    check_reward_source(params)
    reward_fn = None
    if params.rl_reward_fn or not params.rl_reward_model_path:
        reward_fn = resolve_reward_fn(params.rl_reward_fn or "default")
        if not params.rl_reward_fn:
            log.info("no --rl-reward-model-path or --rl-reward-fn: using the built-in 'default' reward "
                     "(word-overlap F1 with the data's answers)")
    config = PPOConfig.from_params(params)
    if params.optimizer not in ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw"):
        log.warning("--optimizer %s: PPO trains with torch AdamW", params.optimizer)

    path, tokenizer, template, model_config = common.load_tokenizer_and_template(params)
    train_records, _ = common.load_records(params, kind="sft")
    budget = common.cutoff_len(params, model_config) - config.max_new_tokens
    if budget < 8:
        raise ConfigError(f"--rl-max-new-tokens {config.max_new_tokens} leaves {budget} tokens of the "
                          f"{common.cutoff_len(params, model_config)}-token context for the prompt. Fix: lower "
                          "--rl-max-new-tokens or raise --block-size")
    prompts = build_prompts(train_records, tokenizer, template, budget)
    stop_ids = stop_token_ids(tokenizer, template)
    extra = getattr(model_config, "eos_token_id", None)  # e.g. Llama 3 instruct lists several
    stop_ids += [i for i in (extra if isinstance(extra, (list, tuple)) else [extra]) if i is not None and i not in stop_ids]

    device = common.device_type()
    policy, dtype = common.load_trainable_model(params, path)
    policy.to(device)
    disable_dropout(policy)
    value_head = ValueHead(policy.config.hidden_size).to(device)

    if params.model_ref:
        ref_model, ref_tok = load_for_inference(params.model_ref, dtype=dtype, device=device,
                                                trust_remote_code=params.trust_remote_code)
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"--model-ref {params.model_ref} has another tokenizer than --model {params.model}, "
                              "so their token log-probabilities cannot be compared. Fix: use a reference of "
                              "the same model family (usually the model you start from)")
        ref_model.requires_grad_(False)
        ref_desc = params.model_ref
    elif is_peft_model(policy):
        ref_model, ref_desc = None, "the base model (LoRA adapter disabled)"
    else:
        ref_model, ref_desc = copy.deepcopy(policy).eval().requires_grad_(False), "a frozen copy of the start model"
    if ref_model is not None:
        disable_dropout(ref_model)
        ref_model.eval()

    reward_model = None
    if params.rl_reward_model_path:
        reward_model = RewardModelScorer(params.rl_reward_model_path, template, device, config.chunk_size)
    log.info("PPO reward: %s; KL reference: %s", " + ".join(
        x for x in (params.rl_reward_model_path and f"reward model {params.rl_reward_model_path}",
                    reward_fn and f"reward function {params.rl_reward_fn or 'default'}") if x), ref_desc)
    return PPOTrainer(policy=policy, value_head=value_head, ref_model=ref_model, tokenizer=tokenizer,
                      template=template, prompts=prompts, config=config, run_dir=run_dir, stop_ids=stop_ids,
                      reward_model=reward_model, reward_fn=reward_fn,
                      report_to=tuple(common.report_to(params)), device=device)


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    from safetensors.torch import save_file

    from core.model.export import save_trained
    from core.templates import attach_template

    run_dir = Path(run_dir)
    trainer = build_trainer(params, run_dir)
    metrics = trainer.train(resume_from=common.resume_path(params, run_dir))
    if STOP.is_set():  # stopped: the checkpoint holds the work; no final save
        return metrics
    if trainer.template is not None:
        attach_template(trainer.tokenizer, trainer.template)  # chat later uses exactly what was trained
    save_trained(trainer.policy, trainer.tokenizer, run_dir, merge_adapter=params.merge_adapter)
    save_file({k: v.contiguous() for k, v in trainer.value_head.state_dict().items()}, str(run_dir / VALUE_HEAD_FILE))
    common.write_model_card(params, run_dir, metrics)
    return metrics
