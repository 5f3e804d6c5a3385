"""What every stage shares: loading the model and tokenizer, the data, TrainingArguments, the
end-of-run saving. A stage file reads top to bottom as: data -> model -> trainer -> save."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

from core.errors import ConfigError
from core.params import LLMTrainingParams

log = logging.getLogger("aitraining")


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cutoff_len(params: LLMTrainingParams, config: Any) -> int:
    """--block-size, or -1: the model's context (max_position_embeddings) capped by --model-max-length."""
    if params.block_size > 0:
        return params.block_size
    model_ctx = getattr(config, "max_position_embeddings", None) or params.model_max_length
    return min(params.model_max_length, model_ctx)


def load_tokenizer_and_template(params: LLMTrainingParams):
    """(model path, tokenizer, chat template source or None, model config)."""
    from transformers import AutoConfig

    from core.model.loader import load_tokenizer, resolve_model
    from core.templates import resolve_chat_template

    path = resolve_model(params.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=params.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=params.trust_remote_code, padding_side=params.padding)
    template = resolve_chat_template(params.chat_template, tokenizer, getattr(config, "model_type", None))
    return path, tokenizer, template, config


def load_records(params: LLMTrainingParams, kind: str):
    from core import DATA_DIR
    from core.data.loader import load_data

    return load_data(
        params.data_path, kind=kind, split=params.train_split, valid_split=params.valid_split,
        val_size=params.val_size, max_samples=params.max_samples, text_column=params.text_column,
        prompt_text_column=params.prompt_text_column, rejected_text_column=params.rejected_text_column,
        column_mapping=params.column_mapping, auto_convert=params.auto_convert_dataset,
        data_dir=Path(params.dataset_dir) if params.dataset_dir else DATA_DIR, seed=params.seed,
        placeholders={"name": params.identity_name, "author": params.identity_author},
    )


def load_trainable_model(params: LLMTrainingParams, path, model_class=None, seq_len: Optional[int] = None):
    """The model with the chosen method applied (full / freeze / LoRA). seq_len (the longest
    example) lets a CPU run turn gradient checkpointing on when the memory estimate needs it."""
    from core.model.adapters import apply_finetuning, trainable_summary
    from core.model.loader import load_model, pick_attention, pick_dtype

    if params.unsloth:  # seed 001's fallback: say so once and train on the standard path
        import importlib.util

        if importlib.util.find_spec("unsloth") is None or device_type() != "cuda":
            log.warning("WARNING: Unsloth not available, continuing without it...")
    dtype = pick_dtype(params.mixed_precision, device_type())
    # On a CPU memory is rarely the limit for the models that train here, and checkpointing
    # costs a second forward pass: keep it for accelerators unless the user disabled it.
    checkpointing = not params.disable_gradient_checkpointing and device_type() == "cuda"
    if device_type() == "cpu" and seq_len and not params.disable_gradient_checkpointing:
        from core.model.memory import needs_checkpointing

        if needs_checkpointing(params, "cpu", seq_len=seq_len):
            checkpointing = True
            log.info("gradient checkpointing on: the memory estimate does not fit without it")
    if not checkpointing and not params.disable_gradient_checkpointing:
        log.info("gradient checkpointing off on CPU (it would recompute activations for no memory need)")
    extra = {"config": rope_scaled_config(params, path)} if params.rope_scaling else {}
    if params.quantization:
        extra["quantization_config"] = quantization_config(params.quantization, dtype)
    model = load_model(path, dtype=dtype,
                       attn_implementation=pick_attention(params.attn_implementation, params.use_flash_attention_2),
                       trust_remote_code=params.trust_remote_code, gradient_checkpointing=checkpointing,
                       model_class=model_class, **extra)
    model = apply_finetuning(
        model, finetuning_type=params.finetuning_type, lora_r=params.lora_r, lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout, target_modules=params.target_modules,
        freeze_trainable_layers=params.freeze_trainable_layers,
        freeze_trainable_modules=params.freeze_trainable_modules,
        freeze_extra_modules=params.freeze_extra_modules, adapter_path=params.adapter_path)
    trainable, total = trainable_summary(model)
    log.info("method %s: %s of %s parameters trainable (%.2f%%)", params.finetuning_type,
             f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    return model, dtype


def quantization_config(kind: str, dtype):
    """The BitsAndBytesConfig for --quantization (QLoRA): int4 is NF4 with double quantization and
    the run dtype as compute dtype; int8 is LLM.int8(). bitsandbytes is imported only here."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantization {kind} needs bitsandbytes, which is not installed. Fix: "
                          "pip install bitsandbytes (or pip install -e \".[bitsandbytes]\"), or drop --quantization")
    from transformers import BitsAndBytesConfig

    if kind == "int4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"--quantization {kind!r}: expected int4 or int8")


def rope_scaled_config(params: LLMTrainingParams, path):
    """The model config with --rope-scaling applied: factor = wanted length / native length."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=params.trust_remote_code)
    native = getattr(config, "max_position_embeddings", None) or params.model_max_length
    wanted = params.block_size if params.block_size > 0 else params.model_max_length
    factor = max(1.0, float(math.ceil(wanted / native)))
    if factor == 1.0:
        log.warning("--rope-scaling %s: %d tokens fit the model's %d already; scaling factor 1",
                    params.rope_scaling, wanted, native)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    layers = [v for v in rope.values() if isinstance(v, dict)]  # per-attention-type parameters (Gemma 3)
    for target in layers or [rope]:
        target.update(rope_type=params.rope_scaling, factor=factor)
        if params.rope_scaling in ("yarn", "llama3"):
            target.setdefault("original_max_position_embeddings", native)
    config.rope_parameters = rope
    log.info("RoPE scaling %s with factor %.1f (context %d -> %d)", params.rope_scaling, factor, native,
             int(native * factor))
    return config


def logging_steps(params: LLMTrainingParams, n_train: int) -> int:
    """-1 means automatic: about 20 points per run (so short runs still draw a curve), at most every 25."""
    if params.logging_steps > 0:
        return params.logging_steps
    per_epoch = math.ceil(n_train / (params.batch_size * params.gradient_accumulation))
    total = params.max_steps if params.max_steps > 0 else per_epoch * params.epochs
    return max(1, min(25, total // 20))


def report_to(params: LLMTrainingParams) -> list[str]:
    import importlib.util
    import os

    if params.log == "none":
        return []
    if params.log == "wandb":
        if importlib.util.find_spec("wandb") is None:
            log.warning("--log wandb: the wandb package is not installed (pip install wandb); "
                        "continuing without experiment tracking")
            return []
        os.environ.setdefault("WANDB_MODE", "offline" if os.environ.get("HF_HUB_OFFLINE") else "online")
        return ["wandb"]
    return ["tensorboard"]


def training_args(params: LLMTrainingParams, run_dir: Path, *, n_train: int, has_eval: bool, dtype,
                  **overrides):
    """TrainingArguments from the schema. The same for every stage built on HF/TRL trainers."""
    from transformers import TrainingArguments

    cls = overrides.pop("args_class", TrainingArguments)
    eval_strategy = params.eval_strategy if has_eval else "no"
    if params.eval_strategy != "no" and not has_eval:
        log.info("no validation data (--valid-split / --val-size): evaluation is off")
    kw = dict(
        output_dir=str(run_dir),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.eval_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation,
        learning_rate=params.lr,
        warmup_steps=params.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        optim=params.optimizer,
        lr_scheduler_type=params.scheduler,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        seed=params.seed,
        data_seed=params.seed,
        eval_strategy=eval_strategy,
        eval_steps=(params.eval_steps or params.save_steps) if eval_strategy == "steps" else None,
        save_strategy=params.save_strategy,
        save_steps=params.save_steps,
        save_total_limit=params.save_total_limit,
        logging_steps=logging_steps(params, n_train),
        logging_first_step=True,
        auto_find_batch_size=params.auto_find_batch_size,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        report_to=report_to(params),
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        save_only_model=False,
        dataloader_pin_memory=device_type() == "cuda",
    )
    kw.update(overrides)
    return cls(**kw)


def resume_path(params: LLMTrainingParams, run_dir: Path) -> Optional[str]:
    """--resume-from-checkpoint: a path, or 'auto' for the newest complete checkpoint in the run."""
    from transformers.trainer_utils import get_last_checkpoint

    choice = params.resume_from_checkpoint
    if not choice:
        if run_dir.is_dir() and get_last_checkpoint(str(run_dir)):
            log.warning("%s holds checkpoints from an earlier run; this run starts fresh. Pass "
                        "--resume-from-checkpoint auto to continue it instead.", run_dir)
        return None
    if choice == "auto":
        last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        if last is None:
            log.warning("--resume-from-checkpoint auto: no checkpoint in %s yet; starting from step 0", run_dir)
        else:
            log.info("resuming from %s", last)
        return last
    if not (Path(choice) / "trainer_state.json").is_file():
        raise ConfigError(f"--resume-from-checkpoint {choice}: not a checkpoint directory (no "
                          "trainer_state.json); use 'auto' or a checkpoint-N directory of a run")
    return choice


def train_and_save(trainer, params: LLMTrainingParams, run_dir: Path, tokenizer, template: Optional[str], *,
                   has_eval: bool, save=None) -> dict:
    """Train (resuming when asked), evaluate, save the model with the chat template it trained
    with, write the model card; an aborted run keeps its checkpoint and skips the final save.
    save(trainer) replaces the default saving (e.g. a reward model, a value head)."""
    from core.events import STOP
    from core.model.export import save_trained
    from core.templates import attach_template

    result = trainer.train(resume_from_checkpoint=resume_path(params, run_dir))
    metrics = dict(result.metrics)
    if STOP.is_set():
        return metrics
    if has_eval:
        metrics.update(trainer.evaluate())
    if template is not None:
        attach_template(tokenizer, template)  # chat later uses exactly what was trained
    if save is not None:
        save(trainer)
    else:
        save_trained(trainer.model, tokenizer, run_dir, merge_adapter=params.merge_adapter)
    write_model_card(params, run_dir, metrics)
    return metrics


def write_model_card(params: LLMTrainingParams, run_dir: Path, metrics: dict) -> None:
    from core.config_io import atomic_write

    lines = [
        f"# {run_dir.name}", "",
        f"Fine-tuned from `{params.model}` with aitraining (`--trainer {params.trainer}`, "
        f"method `{params.finetuning_type}`) on `{params.data_path}`.", "",
        "## Reproduce", "", "```", f"aitraining --config {run_dir / 'config.yaml'}", "```", "",
        "## Results", "",
    ]
    lines += [f"- {k}: {v}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float, str))]
    atomic_write(run_dir / "README.md", "\n".join(lines) + "\n")
