"""Training-loop efficiency shared by the stages built on transformers' Trainer:

- optimizers transformers does not build the way we need: LoRA+ (B matrices at lr x ratio, through
  peft's create_loraplus_optimizer), Adam-mini and BAdam (their own packages, imported lazily);
  handed to the Trainer as an optimizer factory, so resume, schedulers and logging stay the Trainer's;
- chunked cross-entropy: the model returns its final hidden states instead of logits, and the loss
  is taken through lm_head one chunk of tokens at a time (each chunk recomputed in backward), so the
  (tokens x vocab) logits never exist whole - the largest tensor of a 262k-vocabulary model.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import Trainer

from core.errors import ConfigError
from core.model.chunked_ce import chunked_lm_loss
from core.params import EXTRA_OPTIMIZERS, LLMTrainingParams

log = logging.getLogger("aitraining")

AUTO_CHUNKED_CE_VOCAB = 100_000  # --chunked-ce unset: on from this vocabulary size (Gemma 262k, Qwen 151k)


# ---------------------------------------------------------------------------- optimizers

def _require(package: str, pip: str, option: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{option} needs the {pip} package, which is not installed. Fix: pip install {pip} "
                          f"(or pip install -e \".[{pip}]\"), or choose another --optimizer")


def check_optimizer_packages(params: LLMTrainingParams) -> None:
    """A clear error before loading anything when the chosen optimizer's package is missing."""
    opt = params.optimizer
    if opt.startswith("galore"):
        _require("galore_torch", "galore-torch", f"--optimizer {opt}")
    elif opt.startswith("apollo"):
        _require("apollo_torch", "apollo-torch", f"--optimizer {opt}")
    elif opt == "adam_mini":
        _require("adam_mini", "adam-mini", "--optimizer adam_mini")
    elif opt == "badam":
        _require("badam", "badam", "--optimizer badam")


def optimizer_factory(params: LLMTrainingParams, args):
    """A callable model -> optimizer for Trainer.optimizer_cls_and_kwargs, or None to let the
    Trainer build transformers' own optimizer (--optimizer by name)."""
    if params.optimizer == "adam_mini":
        return lambda model: _adam_mini(model, args)
    if params.optimizer == "badam":
        return lambda model: _badam(model, args, params.badam_switch_interval)
    if params.loraplus_lr_ratio:
        return lambda model: _loraplus(model, args, params.loraplus_lr_ratio)
    return None


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _loraplus(model, args, ratio: float):
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    opt = create_loraplus_optimizer(model, cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=args.weight_decay, **kwargs)
    log.info("LoRA+: B matrices at lr %.3g (x%g), A matrices at %.3g", args.learning_rate * ratio, ratio,
             args.learning_rate)
    return opt


def _adam_mini(model, args):
    from adam_mini import Adam_mini

    cfg = getattr(model, "config", None)
    get = (lambda k, d: getattr(cfg, k, None) or d)
    n_heads = get("num_attention_heads", 1)
    return Adam_mini(named_parameters=_trainable(model), lr=args.learning_rate,
                     betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                     weight_decay=args.weight_decay, dim=get("hidden_size", 1), n_heads=n_heads,
                     n_kv_heads=get("num_key_value_heads", n_heads), verbose=False)


def _badam(model, args, switch_every: int):
    from badam import BlockOptimizer

    base = torch.optim.AdamW([p for _, p in _trainable(model)], lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             weight_decay=args.weight_decay)
    return BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                          switch_block_every=switch_every, switch_mode="ascending", verbose=0)


def training_optim_name(params: LLMTrainingParams) -> str:
    """The optim name TrainingArguments gets: ours (adam_mini, badam) are built by the factory, so
    TrainingArguments sees its default."""
    return "adamw_torch" if params.optimizer in EXTRA_OPTIMIZERS else params.optimizer


# ---------------------------------------------------------------------------- chunked cross-entropy

def chunked_ce_wanted(params: LLMTrainingParams, config) -> bool:
    if params.chunked_ce is not None:
        return params.chunked_ce
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 0)
    return vocab >= AUTO_CHUNKED_CE_VOCAB


class LMTrainer(Trainer):
    """transformers' Trainer with the chunked loss when `chunked_ce` is set."""

    chunked_ce = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunked_ce or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        ref = next(iter(inputs.values()))
        # no logits at all (an empty index), and the final hidden states (after the last norm)
        outputs = model(**inputs, output_hidden_states=True,
                        logits_to_keep=torch.zeros(0, dtype=torch.long, device=ref.device))
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.get_output_embeddings()
        softcap = getattr(getattr(unwrapped, "config", None), "final_logit_softcapping", None)
        loss = chunked_lm_loss(outputs.hidden_states[-1], labels, head, softcap=softcap,
                               num_items_in_batch=num_items_in_batch if self.model_accepts_loss_kwargs else None)
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def configure_trainer(trainer, params: LLMTrainingParams, model_config=None) -> None:
    """Attach the optimizer factory and (LMTrainer) the chunked loss. Idempotent."""
    factory = optimizer_factory(params, trainer.args)
    if factory is not None:
        trainer.optimizer_cls_and_kwargs = (lambda: factory, {})
    if isinstance(trainer, LMTrainer) and model_config is not None:
        liger = bool(getattr(trainer.args, "use_liger_kernel", False))  # its fused loss already chunks
        trainer.chunked_ce = chunked_ce_wanted(params, model_config) and not liger
        if trainer.chunked_ce:
            log.info("chunked cross-entropy: logits computed %s at a time", "a chunk of tokens")
