"""Training-loop efficiency shared by the stages built on transformers' Trainer:

- optimizers transformers does not build the way we need: LoRA+ (B matrices at lr x ratio, through
  peft's create_loraplus_optimizer), Adam-mini and BAdam (their own packages, imported lazily);
  handed to the Trainer as an optimizer factory, so resume, schedulers and logging stay the Trainer's;
- chunked cross-entropy: the model returns its final hidden states instead of logits, and the loss
  is taken through lm_head one chunk of trained tokens at a time, the gradients made in the same
  pass (core/model/chunked_ce.py), so the (tokens x vocab) logits never exist whole - the largest
  tensor of a 262k-vocabulary model, and at batch 8 x 256 of a 49k one.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import Trainer

from core.errors import ConfigError
from core.model import chunked_ce as cce
from core.params import EXTRA_OPTIMIZERS, LLMTrainingParams

log = logging.getLogger("aitraining")


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
    """--chunked-ce, or unset: on for a big vocabulary or when a micro-batch's logits would be big."""
    if params.chunked_ce is not None:
        return params.chunked_ce
    from core.model.memory import chunked_ce_on, seq_len_for

    return chunked_ce_on(params, config, params.batch_size * seq_len_for(params, config))


def logit_transform(config) -> tuple:
    """(softcap, scale) the model applies to its logits: Gemma 2/3's final softcapping, Cohere's
    logit_scale, Granite's 1 / logits_scaling; (None, None) for plain heads."""
    text = getattr(config, "text_config", None) or config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if getattr(text, "logits_scaling", None):
        scale = 1.0 / text.logits_scaling
    return softcap, scale


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
        softcap, scale = logit_transform(getattr(unwrapped, "config", None))
        loss = cce.chunked_lm_loss(outputs.hidden_states[-1], labels, head, softcap=softcap, logit_scale=scale,
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
            from core.model import memory

            log.info("chunked cross-entropy: logits made %d trained tokens at a time, never whole",
                     cce.chunk_size(memory.vocab_size(model_config)))
