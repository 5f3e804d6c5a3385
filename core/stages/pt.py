"""Pre-training / continued pre-training (--trainer pt).

Plain text documents are tokenized, each followed by EOS (--add-eos-token) so the model learns
where a document ends, concatenated, and cut into blocks of --block-size tokens. Every token is a
target (labels = input_ids). Blocks all have the same length, so the batches need no padding
and transformers' default_data_collator stacks them.

--packing false trains each document on its own instead (truncated at --block-size, batches
padded), for corpora whose documents must not share a context.
"""
from __future__ import annotations

import logging
from pathlib import Path

from core.events import RunLogCallback
from core.params import LLMTrainingParams
from core.stages import common

log = logging.getLogger("aitraining")

# A block of -1 (the model's context) is capped here: long blocks cost quadratic attention and
# most of continued pre-training's benefit comes from many blocks, not long ones.
MAX_DEFAULT_BLOCK = 1024


def block_size(params: LLMTrainingParams, config) -> int:
    """--block-size, or -1: the model's context (see common.cutoff_len) capped at 1024."""
    if params.block_size > 0:
        return params.block_size
    return min(common.cutoff_len(params, config), MAX_DEFAULT_BLOCK)


def tokenize_documents(tokenizer, records, *, add_eos_token: bool = True, batch: int = 1000):
    """[{"text": str}] -> Dataset of input_ids (bos as the tokenizer adds it, eos appended)."""
    from datasets import Dataset

    texts = [r.get("text") or "" for r in records]
    texts = [t for t in texts if t.strip()]
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is None:
        log.warning("--add-eos-token: the tokenizer has no eos token; documents are joined without one")
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        for seq in tokenizer(texts[start:start + batch])["input_ids"]:
            if add_eos_token and eos is not None and seq[-1:] != [eos]:
                seq = seq + [eos]
            ids.append(seq)
    return Dataset.from_dict({"input_ids": ids})


def _dataset(tokenizer, records, params: LLMTrainingParams, block: int, source: str):
    from core.data.tokenize import neat_pack_dataset, pack_dataset, tokenize_dataset

    if params.neat_packing:  # whole documents per row, none attending to another
        docs = tokenize_dataset(tokenizer, records, None, cutoff_len=block, add_eos_token=params.add_eos_token,
                                source=source)
        return neat_pack_dataset(docs, cutoff_len=block, source=source)
    if params.packing is False:
        return tokenize_dataset(tokenizer, records, None, cutoff_len=block, add_eos_token=params.add_eos_token,
                                source=source)
    docs = tokenize_documents(tokenizer, records, add_eos_token=params.add_eos_token)
    return pack_dataset(docs, cutoff_len=block, pad_token_id=tokenizer.pad_token_id, source=source)


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    """(trainer, tokenizer, chat template, has_eval): everything configured, nothing trained yet."""
    from transformers import DataCollatorForSeq2Seq, default_data_collator, set_seed

    from core.stages.efficiency import LMTrainer

    set_seed(params.seed)
    path, tokenizer, template, config = common.load_tokenizer_and_template(params)
    train_records, eval_records = common.load_records(params, kind="text")
    block = block_size(params, config)
    train_ds = _dataset(tokenizer, train_records, params, block, params.data_path)
    eval_ds = _dataset(tokenizer, eval_records, params, block, "validation") if eval_records else None
    log.info("data: %d documents -> %d training and %d validation blocks of %d tokens", len(train_records),
             len(train_ds), len(eval_ds) if eval_ds is not None else 0, block)

    model, dtype = common.load_trainable_model(params, path, seq_len=block)
    args = common.training_args(params, run_dir, n_train=len(train_ds), has_eval=eval_ds is not None,
                                dtype=dtype)
    from core.data.tokenize import NeatPackCollator

    collator = (NeatPackCollator(tokenizer.pad_token_id) if params.neat_packing
                else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
                if params.packing is False else default_data_collator)
    trainer = LMTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator, processing_class=tokenizer,
                      callbacks=[RunLogCallback(run_dir, "pt")])
    # Plain text has no conversation format; a template is saved only when one was asked for
    # (e.g. to fine-tune the result with it next).
    return trainer, tokenizer, template if params.chat_template else None, eval_ds is not None


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    trainer, tokenizer, template, has_eval = build_trainer(params, run_dir)
    return common.train_and_save(trainer, params, run_dir, tokenizer, template, has_eval=has_eval)
