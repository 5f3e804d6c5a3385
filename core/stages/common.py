"""What every stage shares: loading the model and tokenizer, the data, TrainingArguments, the
end-of-run saving. A stage file reads top to bottom as: data -> model -> trainer -> save."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from core.errors import ConfigError
from core.params import LLMTrainingParams

log = logging.getLogger("aitraining")


def device_type() -> str:
    from core.model.loader import training_device

    return training_device()


def cutoff_len(params: LLMTrainingParams, config: Any) -> int:
    """--block-size, or -1: the model's context (max_position_embeddings) capped by --model-max-length."""
    from core.model.memory import seq_len_for

    return seq_len_for(params, config)


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
    from core.data.loader import load_for_params

    return load_for_params(params, kind)


def load_trainable_model(params: LLMTrainingParams, path, model_class=None, seq_len: Optional[int] = None):
    """The model with the chosen method applied (full / freeze / LoRA family), quantized and
    boosted as asked (each booster falls back with a warning when it cannot run). seq_len (the
    longest example) lets a CPU run turn gradient checkpointing on when the memory estimate needs it."""
    from transformers import AutoConfig

    from core.model import boosters
    from core.model.adapters import apply_finetuning, trainable_summary
    from core.model.loader import load_model, pick_attention, pick_dtype

    dtype = pick_dtype(params.mixed_precision, device_type())
    config = AutoConfig.from_pretrained(path, trust_remote_code=params.trust_remote_code)
    prequantized = boosters.check_prequantized(config, params)
    if model_class is None and boosters.use_unsloth(params, getattr(config, "model_type", None)):
        model = boosters.load_unsloth(params, path, dtype=dtype, max_seq_length=cutoff_len(params, config))
        return model, dtype
    # On a CPU memory is rarely the limit for the models that train here, and checkpointing
    # costs a second forward pass: keep it for accelerators unless the user disabled it.
    checkpointing = not params.disable_gradient_checkpointing and device_type() == "cuda"
    if device_type() == "cpu" and seq_len and not params.disable_gradient_checkpointing:
        from core.model.memory import checkpoint_layers

        checkpointing = checkpoint_layers(params, "cpu", config=config, seq_len=seq_len)
        if checkpointing:
            n_layers = getattr(getattr(config, "text_config", None) or config, "num_hidden_layers", 0)
            log.info("gradient checkpointing on %s: the memory estimate does not fit without it",
                     "every layer" if checkpointing is True else f"{checkpointing} of {n_layers} layers")
    if not checkpointing and not params.disable_gradient_checkpointing:
        log.info("gradient checkpointing off on CPU (it would recompute activations for no memory need)")
    extra = {"config": rope_scaled_config(params, path)} if params.rope_scaling else {}
    if params.quantization and params.quantization_method == "bitsandbytes":
        extra["quantization_config"] = quantization_config(
            params.quantization, compute_dtype(params, dtype), quant_type=params.bnb_4bit_quant_type,
            double_quant=params.double_quantization)
    if prequantized:
        log.info("%s is a pre-quantized %s checkpoint: training LoRA on it", params.model, prequantized)
    model = load_model(path, dtype=dtype,
                       attn_implementation=pick_attention(params.attn_implementation, params.use_flash_attention_2),
                       trust_remote_code=params.trust_remote_code, gradient_checkpointing=checkpointing,
                       model_class=model_class, **extra)
    if params.quantization and params.quantization_method == "hqq":
        model = boosters.hqq_quantize(model, bits=4 if params.quantization == "int4" else 8,
                                      compute_dtype=compute_dtype(params, dtype))
    model = apply_finetuning(
        model, finetuning_type=params.finetuning_type, lora_r=params.lora_r, lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout, target_modules=params.target_modules,
        freeze_trainable_layers=params.freeze_trainable_layers,
        freeze_trainable_modules=params.freeze_trainable_modules,
        freeze_extra_modules=params.freeze_extra_modules, adapter_path=params.adapter_path,
        use_rslora=params.use_rslora, use_dora=params.use_dora, pissa_init=params.pissa_init,
        additional_target=params.additional_target, create_new_adapter=params.create_new_adapter,
        work_dir=Path(params.project_name))
    trainable, total = trainable_summary(model)
    log.info("method %s: %s of %s parameters trainable (%.2f%%)", params.finetuning_type,
             f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    return model, dtype


def compute_dtype(params: LLMTrainingParams, dtype):
    """--compute-dtype of quantized layers, defaulting to the run's dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(params.compute_dtype, dtype)


def quantization_config(kind: str, dtype, *, quant_type: str = "nf4", double_quant: bool = True):
    """The BitsAndBytesConfig for --quantization (QLoRA): int4 is NF4 (or FP4) with double
    quantization and dtype as compute dtype; int8 is LLM.int8(). bitsandbytes is imported only here."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantization {kind} needs bitsandbytes, which is not installed. Fix: "
                          "pip install bitsandbytes (or pip install -e \".[bitsandbytes]\"), or drop --quantization")
    from transformers import BitsAndBytesConfig

    if kind == "int4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
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
    """The trackers asked for. For HF/TRL trainers training_args drops tensorboard: train_and_save
    adds its callback with our writer so everything lands in <run>/tensorboard (core/tracking.py)."""
    import importlib.util

    if params.log == "none":
        return []
    if params.log == "tensorboard":
        return ["tensorboard"]
    if importlib.util.find_spec("wandb") is None:
        log.warning("--log wandb: the wandb package is not installed (pip install wandb); "
                    "continuing without experiment tracking")
        return []
    from core.tracking import configure_wandb

    configure_wandb(params)
    return ["wandb"]


def training_args(params: LLMTrainingParams, run_dir: Path, *, n_train: int, has_eval: bool, dtype,
                  **overrides):
    """TrainingArguments from the schema. The same for every stage built on HF/TRL trainers."""
    from transformers import TrainingArguments

    from core.model import boosters
    from core.stages import efficiency

    efficiency.check_optimizer_packages(params)
    if params.group_by_length and packed(params):
        log.info("--group-by-length is off: packed blocks all have the same length")
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
        optim=efficiency.training_optim_name(params),
        optim_target_modules=_optim_targets(params),
        optim_args=params.optim_args,
        neftune_noise_alpha=params.neftune_noise_alpha,
        use_liger_kernel=boosters.use_liger(params),
        lr_scheduler_type=params.scheduler,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        seed=params.seed,
        data_seed=params.seed,
        eval_strategy=eval_strategy,
        eval_steps=(params.eval_steps or params.save_steps) if eval_strategy == "steps" else None,
        save_strategy=params.save_strategy,
        save_steps=params.save_steps,
        save_total_limit=None,  # RunLogCallback.on_save rotates, once the new checkpoint is complete
        logging_steps=logging_steps(params, n_train),
        logging_first_step=True,
        auto_find_batch_size=params.auto_find_batch_size,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # transformers refuses bf16 on a CPU unless told the CPU is meant (autocast on CPU)
        use_cpu=device_type() == "cpu" and dtype != torch.float32,
        report_to=[r for r in report_to(params) if r != "tensorboard"],
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        save_only_model=False,
        dataloader_pin_memory=device_type() == "cuda",
        # several CPU processes talk over gloo; naming it also lets accelerate count the ranks
        # when DeepSpeed starts them (its state otherwise sees one process on a CPU)
        ddp_backend="gloo" if device_type() == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    if params.group_by_length and not packed(params):  # else the config's own default (KTO needs sequential)
        kw["train_sampling_strategy"] = "group_by_length"
    kw.update(overrides)
    args = cls(**kw)
    args.keep_checkpoints = params.save_total_limit  # read by core.events.RunLogCallback.on_save
    return args


def _optim_targets(params: LLMTrainingParams):
    """GaLore/APOLLO's target modules: "all-linear" or a list of names."""
    if not params.optimizer.startswith(("galore", "apollo")):
        return None
    names = [n.strip() for n in (params.optim_target_modules or "all-linear").split(",") if n.strip()]
    return "all-linear" if names == ["all-linear"] else names


def packed(params: LLMTrainingParams) -> bool:
    return bool(params.packing or params.neat_packing)


def resume_path(params: LLMTrainingParams, run_dir: Path) -> Optional[str]:
    """--resume-from-checkpoint: a path, or 'auto' for the newest complete checkpoint in the run
    (partial ones, left by a kill mid-save, are skipped; core.run has removed them already)."""
    from core import checkpoints
    from core.events import write_status

    choice = params.resume_from_checkpoint
    last = checkpoints.last_complete(run_dir)
    if not choice:
        if last is not None:
            log.warning("%s holds checkpoints from an earlier run; this run starts fresh. Pass "
                        "--resume-from-checkpoint auto to continue it instead.", run_dir)
        write_status(run_dir, resumed_from=None)
        return None
    if choice == "auto":
        if last is None:
            log.warning("--resume-from-checkpoint auto: no complete checkpoint in %s yet; starting from step 0",
                        run_dir)
        else:
            log.info("resuming from %s", last)
        write_status(run_dir, resumed_from=str(last) if last else None)
        return str(last) if last else None
    if not checkpoints.is_complete(choice):
        raise ConfigError(f"--resume-from-checkpoint {choice}: not a complete checkpoint directory (no readable "
                          "trainer_state.json); use 'auto' or a checkpoint-N directory of a run")
    write_status(run_dir, resumed_from=str(choice))
    return choice


def train_and_save(trainer, params: LLMTrainingParams, run_dir: Path, tokenizer, template: Optional[str], *,
                   has_eval: bool, save=None) -> dict:
    """Train (resuming when asked), evaluate, save the model with the chat template it trained
    with, write the model card; an aborted run keeps its checkpoint and skips the final save.
    save(trainer) replaces the default saving (e.g. a reward model, a value head)."""
    from core.events import STOP
    from core.model.export import save_trained
    from core.templates import attach_template

    from core.stages.efficiency import configure_trainer

    configure_trainer(trainer, params, getattr(trainer.model, "config", None))
    tracking = add_callbacks(trainer, params, run_dir, tokenizer, template, has_eval=has_eval)
    try:
        result = trainer.train(resume_from_checkpoint=resume_path(params, run_dir))
        metrics = dict(result.metrics)
        if STOP.is_set():
            return metrics
        if has_eval:
            metrics.update(trainer.evaluate())
        if template is not None:
            attach_template(tokenizer, template)  # chat later uses exactly what was trained
        acc = trainer.accelerator
        state_dict = None
        if is_sharded(trainer):
            # ZeRO-3 / FSDP: each rank holds a shard; every rank takes part in gathering them
            state_dict = acc.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
        if acc.is_main_process:  # one writer for the run directory
            if save is not None:
                save(trainer, state_dict=state_dict) if state_dict is not None else save(trainer)
            else:
                save_trained(acc.unwrap_model(trainer.model), tokenizer, run_dir,
                             merge_adapter=params.merge_adapter, state_dict=state_dict)
            if params.post_train_check and params.stage in ("sft", "distillation") and state_dict is None:
                metrics.update(after_sft(trainer, params, run_dir, tokenizer, template, tracking))
            write_model_card(params, run_dir, metrics)
        acc.wait_for_everyone()
        return metrics
    finally:
        if tracking is not None:
            tracking.close()


def add_callbacks(trainer, params: LLMTrainingParams, run_dir: Path, tokenizer, template, *, has_eval: bool):
    """--use-enhanced-eval, --log tensorboard and a sweep trial's pruning hook; returns the
    TensorBoard tracking callback (or None). The order matters: enhanced metrics are computed
    in on_evaluate before the tracker and the sweep read them."""
    if params.use_enhanced_eval and params.stage in ("sft", "distillation") and has_eval:
        from core.evaluate import make_enhanced_eval_callback

        cb = make_enhanced_eval_callback(params, run_dir, tokenizer, template)
        if cb is not None:
            trainer.add_callback(cb)
    elif params.use_enhanced_eval and not has_eval:
        log.warning("--use-enhanced-eval needs validation data (--valid-split or --val-size); skipped")
    elif params.use_enhanced_eval:
        trainer.add_callback(_perplexity_only())
    tracking = None
    if params.log == "tensorboard" and trainer.accelerator.is_main_process:  # one writer
        from transformers.integrations import TensorBoardCallback

        from core.tracking import TrackingCallback

        tracking = TrackingCallback(run_dir)
        hf_tb = TensorBoardCallback(tb_writer=tracking._writer())
        hf_tb.logging_dir = str(tracking.dir)  # it reopens a writer after train end (final evaluate): same dir
        trainer.add_callback(hf_tb)
        trainer.add_callback(tracking)
    for cb in TRIAL_CALLBACKS:
        trainer.add_callback(cb)
    return tracking


# Callbacks a sweep adds to the trial it runs in this process (core/sweep.py sets and clears it).
TRIAL_CALLBACKS: list = []


def _perplexity_only():
    """Enhanced eval for stages without generation: perplexity from the eval loss."""
    from transformers import TrainerCallback

    from core.evaluate import perplexity

    class PerplexityCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and metrics.get("eval_loss") is not None:
                metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])

    return PerplexityCallback()


def after_sft(trainer, params: LLMTrainingParams, run_dir: Path, tokenizer, template, tracking) -> dict:
    """The post-training check (core/evaluate.py): samples.jsonl, warnings in the log and status."""
    from core.evaluate import SAMPLES_FILE, post_train_check
    from core.events import write_status

    try:
        findings = post_train_check(params, run_dir, trainer.model, tokenizer, template)
    except Exception as e:  # the model is saved: a failing check must not fail the run
        log.warning("post-training check could not run: %s: %s", type(e).__name__, e)
        return {}
    write_status(run_dir, post_check=findings)
    if tracking is not None:
        import json

        rows = [json.loads(x) for x in (run_dir / SAMPLES_FILE).read_text(encoding="utf-8").splitlines() if x]
        tracking.add_samples(rows, trainer.state.global_step)
    return {"post_check_warnings": len(findings["warnings"])}


def is_sharded(trainer) -> bool:
    """True when no rank holds the whole model: DeepSpeed ZeRO-3 or FSDP."""
    if trainer.is_fsdp_enabled:
        return True
    if trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        return plugin.zero_stage == 3
    return False


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
