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
    from transformers import DataCollatorForSeq2Seq, default_data_collator, set_seed

    from core.data.tokenize import NeatPackCollator, neat_pack_dataset, pack_dataset, tokenize_dataset
    from core.stages.efficiency import LMTrainer, configure_trainer

    set_seed(params.seed)
    path, tokenizer, template, config = common.load_tokenizer_and_template(params)
    train_records, eval_records = common.load_records(params, kind="sft")
    opts = dict(cutoff_len=common.cutoff_len(params, config), train_on_prompt=params.train_on_prompt,
                source=params.data_path,
                mask_history=params.mask_history, add_eos_token=params.add_eos_token)
    if params.curriculum:
        from core import curriculum

        train_records = curriculum.sort_records(train_records, params.curriculum)
    train_ds = tokenize_dataset(tokenizer, train_records, template, **opts)
    if params.curriculum:
        train_ds = curriculum.sort_dataset(train_ds, params.curriculum)
        log.info("curriculum: %d examples easy -> hard by %s for %d epoch(s), then shuffled", len(train_ds),
                 params.curriculum, params.curriculum_epochs)
    eval_ds = tokenize_dataset(tokenizer, eval_records, template, **opts) if eval_records else None
    log.info("data: %d training and %d validation examples, cutoff %d tokens", len(train_ds),
             len(eval_ds) if eval_ds is not None else 0, opts["cutoff_len"])

    # Validation is packed the same way: neat packing leaves its loss exactly as unpacked.
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    if params.neat_packing:
        train_ds, eval_ds = (neat_pack_dataset(ds, cutoff_len=opts["cutoff_len"], source=src) if ds is not None
                             else None for ds, src in ((train_ds, params.data_path), (eval_ds, "validation")))
        collator = NeatPackCollator(tokenizer.pad_token_id)
    elif params.packing:
        train_ds, eval_ds = (pack_dataset(ds, cutoff_len=opts["cutoff_len"], pad_token_id=tokenizer.pad_token_id,
                                          source=src) if ds is not None else None
                             for ds, src in ((train_ds, params.data_path), (eval_ds, "validation")))
        collator = default_data_collator

    longest = max((len(x) for x in train_ds["input_ids"]), default=0)
    model, dtype = common.load_trainable_model(params, path, seq_len=longest)
    args = common.training_args(params, run_dir, n_train=len(train_ds), has_eval=eval_ds is not None,
                                dtype=dtype)
    trainer_class = LMTrainer
    if params.curriculum:
        from core.curriculum import CurriculumTrainer

        trainer_class = type("SFTCurriculumTrainer", (CurriculumTrainer, LMTrainer),
                             {"curriculum_epochs": params.curriculum_epochs})
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer, callbacks=[RunLogCallback(run_dir, "sft")],
    )
    configure_trainer(trainer, params, getattr(model, "config", None))  # optimizer factory, chunked loss
    return trainer, tokenizer, template, eval_ds is not None


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    trainer, tokenizer, template, has_eval = build_trainer(params, run_dir)
    return common.train_and_save(trainer, params, run_dir, tokenizer, template, has_eval=has_eval)

