"""Supervised fine-tuning (--trainer default / sft / generic).

Conversations are rendered with the chat template and trained on the answers only (unless
--train-on-prompt); plain text (--chat-template none, or a text column) is trained whole.
"""
from __future__ import annotations

import logging
from pathlib import Path

from core.events import RunLogCallback
from core.params import LLMTrainingParams
from core.stages import common

log = logging.getLogger("aitraining")


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    """(trainer, tokenizer, chat template, has_eval): everything configured, nothing trained yet."""
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from core.data.tokenize import tokenize_dataset

    set_seed(params.seed)
    path, tokenizer, template, config = common.load_tokenizer_and_template(params)
    train_records, eval_records = common.load_records(params, kind="sft")
    opts = dict(cutoff_len=common.cutoff_len(params, config), train_on_prompt=params.train_on_prompt,
                source=params.data_path,
                mask_history=params.mask_history, add_eos_token=params.add_eos_token)
    train_ds = tokenize_dataset(tokenizer, train_records, template, **opts)
    eval_ds = tokenize_dataset(tokenizer, eval_records, template, **opts) if eval_records else None
    log.info("data: %d training and %d validation examples, cutoff %d tokens", len(train_ds),
             len(eval_ds) if eval_ds is not None else 0, opts["cutoff_len"])

    longest = max((len(x) for x in train_ds["input_ids"]), default=0)
    model, dtype = common.load_trainable_model(params, path, seq_len=longest)
    args = common.training_args(params, run_dir, n_train=len(train_ds), has_eval=eval_ds is not None,
                                dtype=dtype)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        processing_class=tokenizer, callbacks=[RunLogCallback(run_dir, "sft")],
    )
    return trainer, tokenizer, template, eval_ds is not None


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    trainer, tokenizer, template, has_eval = build_trainer(params, run_dir)
    return common.train_and_save(trainer, params, run_dir, tokenizer, template, has_eval=has_eval)
