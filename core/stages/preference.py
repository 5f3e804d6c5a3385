"""What the preference stages (dpo, orpo, simpo, kto) share, over TRL's Config + Trainer pairs.

Each stage file names its TRL pair and maps its own flags; this module does the rest, the same
for all four: records -> chat template on the tokenizer (TRL renders the conversations with it)
-> model (+ reference) -> trainer, with our truncation in front of TRL's collator -> save.

Reference model (DPO, KTO): --model-ref when given; else with LoRA the frozen base under the
adapter (TRL's behaviour for a PeftModel and ref_model=None); else (full, freeze) a frozen copy
of the model as loaded, before any step.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

from core.events import RunLogCallback
from core.params import LLMTrainingParams
from core.stages import common

log = logging.getLogger("aitraining")

# TRL keeps the reference of a LoRA run as a second adapter by this name (a copy of the adapter
# at step 0); it is scaffolding, not a result, so it is not saved with the trained adapter.
REF_ADAPTER = "ref"


class TruncatingCollator:
    """Cuts each tokenized example before TRL's collator pads it: the prompt to its last
    --max-prompt-length tokens (the end, next to the answer, is what the answer depends on), each
    answer to its first --max-completion-length tokens and to what the cutoff leaves after the
    prompt. Two layouts occur: prompt_ids + chosen_ids/rejected_ids/completion_ids (DPO, KTO) and
    prompt_input_ids + <side>_input_ids/_attention_mask/_labels with the prompt inside (ORPO, CPO)."""

    ANSWERS = ("chosen_ids", "rejected_ids", "completion_ids", "KL_completion_ids")

    def __init__(self, inner, *, max_prompt: int, max_completion: int | None, cutoff: int):
        self.inner, self.max_prompt, self.max_completion, self.cutoff = inner, max_prompt, max_completion, cutoff

    def _answer_budget(self, prompt_len: int) -> int:
        room = max(self.cutoff - prompt_len, 1)
        return min(room, self.max_completion) if self.max_completion else room

    def cut(self, ex: dict) -> dict:
        ex = dict(ex)
        if "prompt_ids" in ex:
            ex["prompt_ids"] = ex["prompt_ids"][-self.max_prompt:]
            budget = self._answer_budget(len(ex["prompt_ids"]))
            for key in self.ANSWERS:
                if key in ex:
                    ex[key] = ex[key][:budget]
            return ex
        for key in ("prompt_input_ids", "prompt_attention_mask"):
            if key in ex:
                ex[key] = ex[key][-self.max_prompt:]
        for side in ("chosen", "rejected"):
            labels = ex[f"{side}_labels"]
            n_prompt = next((i for i, v in enumerate(labels) if v != -100), len(labels))
            start = max(0, n_prompt - self.max_prompt)
            end = n_prompt + self._answer_budget(n_prompt - start)
            for key in ("input_ids", "attention_mask", "labels"):
                seq = ex[f"{side}_{key}"]
                ex[f"{side}_{key}"] = seq[start:n_prompt] + seq[n_prompt:end]
        return ex

    def __call__(self, examples):
        return self.inner([self.cut(ex) for ex in examples])


def plain_text(record: dict) -> dict:
    """A conversational record as TRL's plain-text one: each part's message contents, concatenated."""
    return {**record, **{k: "".join(m["content"] for m in record[k])
                         for k in ("prompt", "chosen", "rejected", "completion") if k in record}}


def reference_model(params: LLMTrainingParams, model, dtype):
    """The frozen reference for DPO/KTO, or None where TRL uses the base under the LoRA adapter."""
    if params.model_ref is None and params.finetuning_type == "lora":
        return None
    if params.model_ref is None:  # full / freeze: the weights as loaded, before any update
        ref = copy.deepcopy(model)
    else:
        from core.model.loader import load_model, pick_attention, resolve_model

        ref_path = resolve_model(params.model_ref)
        extra = {"config": common.rope_scaled_config(params, ref_path)} if params.rope_scaling else {}
        ref = load_model(ref_path, dtype=dtype, trust_remote_code=params.trust_remote_code,
                         attn_implementation=pick_attention(params.attn_implementation,
                                                            params.use_flash_attention_2), **extra)
        log.info("reference model: %s", params.model_ref)
    return ref.requires_grad_(False).eval()


def build_trainer(params: LLMTrainingParams, run_dir: Path, *, config_class, trainer_class, kind: str,
                  reference: bool, **config_kwargs):
    """(trainer, tokenizer, chat template, has_eval) for a TRL preference trainer; config_kwargs
    are the stage's own Config fields (beta, loss_type, ...)."""
    from datasets import Dataset
    from transformers import set_seed

    from core.templates import attach_template

    set_seed(params.seed)
    path, tokenizer, template, config = common.load_tokenizer_and_template(params)
    # TRL renders conversational records with tokenizer.apply_chat_template: give it ours.
    attach_template(tokenizer, template)
    train_records, eval_records = common.load_records(params, kind=kind)
    if template is None:  # --chat-template none: plain text, to which TRL appends EOS after each answer
        train_records = [plain_text(r) for r in train_records]
        eval_records = [plain_text(r) for r in eval_records] if eval_records else eval_records
    train_ds = Dataset.from_list(train_records)
    eval_ds = Dataset.from_list(eval_records) if eval_records else None
    cutoff = common.cutoff_len(params, config)
    log.info("data: %d training and %d validation %s records; prompt <= %d, answer <= %s, total <= %d tokens",
             len(train_ds), len(eval_ds) if eval_ds is not None else 0, kind, params.max_prompt_length,
             params.max_completion_length or "rest", cutoff)

    model, dtype = common.load_trainable_model(params, path, seq_len=cutoff)
    extra = {}
    if reference:
        extra["ref_model"] = reference_model(params, model, dtype)
    # activation (gradient) checkpointing off in the Trainer: the model loader already chose (on
    # for CUDA, off on CPU); TRL's configs default it to True, which would force it on CPUs too.
    args = common.training_args(params, run_dir, n_train=len(train_ds), has_eval=eval_ds is not None, dtype=dtype,
                                args_class=config_class, activation_checkpointing=False, max_length=cutoff,
                                **config_kwargs)
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=[RunLogCallback(run_dir, params.stage)], **extra)
    trainer.data_collator = TruncatingCollator(trainer.data_collator, max_prompt=params.max_prompt_length,
                                               max_completion=params.max_completion_length, cutoff=cutoff)
    return trainer, tokenizer, template, eval_ds is not None


def run(built, params: LLMTrainingParams, run_dir: Path) -> dict:
    """Train and save what build_trainer built (the trained adapter without TRL's reference copy)."""
    from core.model.export import is_peft_model, save_trained

    trainer, tokenizer, template, has_eval = built

    def save(trainer, state_dict=None):
        model = trainer.accelerator.unwrap_model(trainer.model)
        if is_peft_model(model) and REF_ADAPTER in model.peft_config:
            model.delete_adapter(REF_ADAPTER)
        save_trained(model, tokenizer, run_dir, merge_adapter=params.merge_adapter, state_dict=state_dict)

    return common.train_and_save(trainer, params, run_dir, tokenizer, template, has_eval=has_eval, save=save)
