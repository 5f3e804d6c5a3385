"""Reward modeling (--trainer reward): a scalar scorer trained on prompt/chosen/rejected pairs.

The base model is loaded as AutoModelForSequenceClassification with one label: its score head
(new, randomly initialised) reads the hidden state of the last non-pad token. prompt+chosen and
prompt+rejected are rendered with core.templates.encode_conversation (the chat template, bos as
the tokenizer wants, eos at the end): the same renderer SFT trains with and PPO scores with, so a
reward is read at the same token in training and in use. TRL's RewardTrainer takes the token ids,
drops pairs longer than --block-size, and trains -log sigmoid(r_chosen - r_rejected); its
eval_accuracy is the share of validation pairs scored chosen > rejected. The score head trains
with every method (full, freeze, LoRA).

What a run leaves, so that `--rl-reward-model-path <run_dir>` just works:

    <run_dir>/config.json, model.safetensors, tokenizer files   the full reward model (always)
    <run_dir>/adapter/                                          the LoRA adapter (LoRA only)
    <run_dir>/merged/                                           same files as the run dir (LoRA
                                                                with --merge-adapter; hard links)

load_reward_model(path) loads any of these (a run dir, merged/, adapter/), and reward_scores
scores conversations exactly as training rendered them.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import types
from pathlib import Path
from typing import Optional, Sequence, Union

from core.errors import ConfigError, DataError
from core.events import RunLogCallback
from core.params import LLMTrainingParams
from core.stages import common

log = logging.getLogger("aitraining")

ADAPTER_SUBDIR = "adapter"


def _seqcls_class(pad_token_id: Optional[int]):
    """A stand-in for a model class whose from_pretrained loads a one-label reward model
    (what common.load_trainable_model / load_model call)."""
    from transformers import AutoModelForSequenceClassification

    def from_pretrained(path, **kw):
        extra = {"num_labels": 1, "pad_token_id": pad_token_id}
        if kw.get("config") is not None:  # a prepared config (--rope-scaling): set them there
            for k, v in extra.items():
                setattr(kw["config"], k, v)
            extra = {}
        return AutoModelForSequenceClassification.from_pretrained(path, **extra, **kw)

    return types.SimpleNamespace(from_pretrained=from_pretrained, __name__="AutoModelForSequenceClassification")


def _train_head(model) -> None:
    """Freeze tuning picks decoder layers; the score head is new and must train too."""
    prefix = getattr(model, "base_model_prefix", "model")
    head = [n for n, p in model.named_parameters() if not n.startswith(prefix + ".")]
    for name, p in model.named_parameters():
        if name in head and p.is_floating_point():
            p.requires_grad_(True)
    if head:
        log.info("reward head trainable: %s", ", ".join(head))


def _adapter_in(path) -> Optional[Path]:
    """A reward run's adapter: the run dir's adapter/ (or the path itself when it is one)."""
    from core.model.loader import is_adapter_dir

    path = Path(path)
    for cand in (path, path / ADAPTER_SUBDIR):
        if is_adapter_dir(cand):
            return cand
    return None


def encode_conversation_ids(tokenizer, messages, chat_template: Optional[str], tools=None) -> list[int]:
    """A whole conversation (ending with the scored answer) -> the ids the reward model reads."""
    from core.templates import encode_conversation

    return encode_conversation(tokenizer, list(messages), chat_template, tools=tools, add_eos_token=True)[0]


def encode_pairs(tokenizer, records, chat_template: Optional[str]):
    """Preference records -> Dataset of chosen_ids / rejected_ids (TRL's tokenized columns)."""
    from datasets import Dataset

    rows = {"chosen_ids": [], "rejected_ids": []}
    for r in records:
        for key in ("chosen", "rejected"):
            rows[f"{key}_ids"].append(encode_conversation_ids(tokenizer, r["prompt"] + r[key], chat_template,
                                                              r.get("tools")))
    return Dataset.from_dict(rows)


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    """(trainer, tokenizer, chat template, has_eval): everything configured, nothing trained yet."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from core.templates import attach_template, load_template

    set_seed(params.seed)
    if params.adapter_path and not (Path(params.adapter_path) / "adapter_config.json").is_file():
        found = _adapter_in(params.adapter_path)  # a reward run directory keeps it in adapter/
        if found is not None:
            params = params.model_copy(update={"adapter_path": str(found)})
    path, tokenizer, template, config = common.load_tokenizer_and_template(params)
    # The saved tokenizer carries the template the pairs were rendered with; without one
    # (--chat-template none) that is the "empty" template (contents concatenated), so a scorer
    # always renders exactly as training did.
    if template is not None:
        attach_template(tokenizer, template)
    else:
        tokenizer.chat_template = load_template("empty").source
    if not params.add_eos_token:
        log.warning("--no-add-eos-token is ignored for reward models: every scored conversation ends "
                    "with eos, in training and in PPO alike")
    train_records, eval_records = common.load_records(params, kind="preference")
    train_ds = encode_pairs(tokenizer, train_records, tokenizer.chat_template)
    eval_ds = encode_pairs(tokenizer, eval_records, tokenizer.chat_template) if eval_records else None

    model, dtype = common.load_trainable_model(params, path,
                                               model_class=_seqcls_class(tokenizer.pad_token_id))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if params.finetuning_type == "freeze":
        _train_head(base)
    base.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token

    max_length = common.cutoff_len(params, config)
    args = common.training_args(
        params, run_dir, n_train=len(train_ds), has_eval=eval_ds is not None, dtype=dtype,
        args_class=RewardConfig, max_length=max_length,
        # the model loader already turned activation checkpointing on where it pays (CUDA); TRL's
        # default (on) would have the Trainer force it on a CPU too
        activation_checkpointing=False,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=[RunLogCallback(run_dir, "reward")])
    kept = len(trainer.train_dataset)
    if kept < len(train_ds):
        log.warning("%s: %d of %d pairs are longer than %d tokens (chosen or rejected) and were skipped; "
                    "raise --block-size to keep them", params.data_path, len(train_ds) - kept, len(train_ds),
                    max_length)
    if kept == 0:
        raise DataError(params.data_path, f"every pair is longer than {max_length} tokens",
                        fix="raise --block-size/--cutoff-len")
    log.info("data: %d training and %d validation pairs, max length %d tokens", kept,
             len(trainer.eval_dataset) if eval_ds is not None else 0, max_length)
    return trainer, tokenizer, template, eval_ds is not None


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    trainer, tokenizer, template, has_eval = build_trainer(params, run_dir)
    save = functools.partial(save_reward_model, tokenizer=tokenizer, run_dir=run_dir, params=params)
    return common.train_and_save(trainer, params, run_dir, tokenizer, template, has_eval=has_eval,
                                 save=lambda trainer: save(trainer.model))


# ------------------------------------------------------------------------------------ saving

def save_reward_model(model, *, tokenizer, run_dir: Path, params: LLMTrainingParams) -> None:
    """Full / freeze: the model into run_dir. LoRA: the adapter into run_dir/adapter, the merged
    full model (reloaded from the saved adapter, which proves it complete) into run_dir, and with
    --merge-adapter the same files under run_dir/merged."""
    from core.model.export import is_peft_model, save_trained

    run_dir = Path(run_dir)
    if not is_peft_model(model):
        save_trained(model, tokenizer, run_dir)
        return
    adapter_dir = run_dir / ADAPTER_SUBDIR
    save_trained(model, tokenizer, adapter_dir, merge_adapter=False)
    merged = _merge(adapter_dir, trust_remote_code=params.trust_remote_code)
    tmp = run_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in files:  # the run dir itself is the reward model
        if params.merge_adapter:
            _link(tmp / name, run_dir / name)  # merged/ keeps them too
        else:
            os.replace(tmp / name, run_dir / name)
    if params.merge_adapter:
        shutil.rmtree(run_dir / "merged", ignore_errors=True)
        tmp.rename(run_dir / "merged")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("reward model: %s (adapter in %s)", run_dir, adapter_dir)


def _link(src: Path, dst: Path) -> None:
    """dst as a hard link to src (no second copy of the weights), a copy across file systems."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _merge(adapter_dir: Path, *, dtype=None, trust_remote_code: bool = False):
    """The base loaded as a one-label reward model, the adapter (LoRA + score head) applied and
    merged; in fp32 for the merge, then cast to the base's saved dtype (or dtype)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig

    from core.model.loader import adapter_base, load_tokenizer, resolve_model

    base = resolve_model(adapter_base(adapter_dir))
    pad = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base).pad_token_id
    model = _seqcls_class(pad).from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if dtype is None:
        dtype = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float32:
        model = model.to(dtype)
    return model


# ------------------------------------------------------------------------------------ using it

def load_reward_model(path, *, dtype=None, device=None, trust_remote_code: bool = False):
    """(model, tokenizer) of a reward model, in eval mode, for scoring (e.g. PPO's rewards).

    path: a reward run directory (holds the full model), its merged/ or adapter/ folder, or any
    directory holding a one-label *ForSequenceClassification model. The tokenizer carries the
    chat template the model was trained with; model.config.pad_token_id is set.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from core.model.loader import load_tokenizer, pick_device, pick_dtype, resolve_model

    src = Path(path)
    device = str(device or pick_device())
    dtype = dtype or pick_dtype(None, device)
    if src.is_dir() and not (src / "config.json").is_file() and _adapter_in(src) is not None:
        adapter = _adapter_in(src)
        model = _merge(adapter, dtype=dtype, trust_remote_code=trust_remote_code)
        tok_src = adapter
    else:
        src = resolve_model(path)
        cfg = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
        archs = list(getattr(cfg, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in archs) or cfg.num_labels != 1:
            raise ConfigError(f"{path} is not a reward model (architectures {archs}, {cfg.num_labels} labels): "
                              "a reward model scores with one output. Fix: train one with --trainer reward "
                              "and pass its run directory")
        model = AutoModelForSequenceClassification.from_pretrained(src, dtype=dtype,
                                                                   trust_remote_code=trust_remote_code)
        tok_src = src
    tokenizer = load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return model, tokenizer


Conversation = Sequence[dict]


def reward_scores(model, tokenizer, items: Sequence[Union[Conversation, str]], *, batch_size: int = 8,
                  chat_template: Optional[str] = None):
    """Scores (a float tensor, one per item) of whole conversations [{"role", "content"}, ...]
    ending with the scored assistant answer, rendered as reward training rendered them (the
    tokenizer's template, else chat_template, else contents concatenated; eos at the end). A str
    item is taken as already rendered text. Batches are right-padded: padding changes no score."""
    import torch

    from core.templates import _own_template

    template = _own_template(tokenizer) or chat_template
    ids = []
    for item in items:
        if isinstance(item, str):
            ids.append(tokenizer(item)["input_ids"])
        else:
            ids.append(encode_conversation_ids(tokenizer, item, template))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):
            input_ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        out.append(logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
