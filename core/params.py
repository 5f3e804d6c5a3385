"""The one schema: every training parameter, declared once.

The CLI flag (`--batch-size`), the YAML key (`batch_size`), the Python keyword and the web
widget are all derived from the fields below. Defaults follow the `aitraining llm` reference
(seed 000); LLaMA Board parameters that it lacks (finetuning type, freeze, train-on-prompt,
mask-history, val-size, cutoff-len) are added in the same style. Each field's metadata says
which help group it belongs to; cross-field rules live in the validators at the bottom.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

# Trainer names accepted by --trainer, and the stage each one runs. `default`, `sft` and
# `generic` are aliases (seed 000): all three run supervised fine-tuning.
TRAINER_STAGE = {
    "default": "sft", "sft": "sft", "generic": "sft",
    "pt": "pt", "reward": "reward", "dpo": "dpo", "orpo": "orpo", "simpo": "simpo",
    "kto": "kto", "ppo": "ppo", "distillation": "distillation",
}
Trainer = Literal["default", "sft", "generic", "pt", "reward", "dpo", "orpo", "simpo", "kto", "ppo",
                  "distillation"]

# Help groups in display order: (title, trainers that use the group; None = every trainer).
GROUPS: dict[str, tuple[str, Optional[set[str]]]] = {
    "basic": ("Basic parameters", None),
    "training": ("Training configuration", None),
    "checkpoint": ("Checkpointing and evaluation", None),
    "performance": ("Performance and memory", None),
    "backend": ("Backend and distribution", None),
    "peft": ("PEFT / LoRA", None),
    "freeze": ("Freeze (partial-parameter) tuning", None),
    "data": ("Data processing", None),
    "preference": ("DPO / ORPO / preference", {"dpo", "orpo", "simpo", "kto", "reward"}),
    "distillation": ("Knowledge distillation", {"distillation"}),
    "ppo": ("PPO (reinforcement learning)", {"ppo"}),
    "logging": ("Logging and monitoring", None),
    "hub": ("Push to Hugging Face Hub", None),
    "sweep": ("Hyperparameter sweep", None),
    "eval": ("Enhanced evaluation", None),
}


def P(default: Any, help: str, group: str, **hints: Any) -> Any:
    """A schema field: default, help text, help group and UI hints in one place.

    hints: `aliases` (extra CLI flags / YAML keys), `secret` (never written or shown),
    `ui` (widget hint for the web form), plus any pydantic constraint (ge, gt, le, lt).
    """
    constraints = {k: hints.pop(k) for k in ("ge", "gt", "le", "lt") if k in hints}
    assert group in GROUPS, group
    return Field(default, description=help, json_schema_extra={"group": group, **hints}, **constraints)


class LLMTrainingParams(BaseModel):
    """Parameters of one training run (`aitraining llm`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, protected_namespaces=())

    # --- basic -------------------------------------------------------------------------------
    model: str = P("google/gemma-3-270m", "Base model to fine-tune: a local directory, a hub id, or a "
                   "packaged offline model (google/gemma-3-270m, HuggingFaceTB/SmolLM2-135M-Instruct)", "basic")
    data_path: str = P("data", "Training data: a dataset name from dataset_info.json (comma-separated for "
                       "several), a directory holding <split>.jsonl/.json/.csv/.parquet, or one file", "basic")
    project_name: str = P("project-name", "Output directory of the run (use a path like ./models/my-run)",
                          "basic")
    train_split: str = P("train", "Training data split (file name without extension inside --data-path)",
                         "basic")
    valid_split: Optional[str] = P(None, "Validation data split (file name inside --data-path)", "basic")

    # --- training ----------------------------------------------------------------------------
    trainer: Trainer = P("default", "Training method: default/sft/generic (supervised fine-tuning), pt, "
                         "reward, dpo, orpo, simpo, kto, ppo, distillation", "training")
    epochs: int = P(1, "Number of training epochs", "training", ge=1)
    batch_size: int = P(2, "Training batch size per device", "training", ge=1)
    lr: float = P(3e-5, "Learning rate", "training", gt=0)
    mixed_precision: Optional[Literal["fp16", "bf16"]] = P(
        None, "Mixed precision: fp16, bf16 or none (none picks from the hardware: fp32 on CPUs "
        "without native bf16)", "training")
    gradient_accumulation: int = P(4, "Gradient accumulation steps", "training", ge=1)
    warmup_ratio: float = P(0.1, "Fraction of steps used for learning-rate warmup", "training", ge=0, lt=1)
    optimizer: str = P("adamw_torch", "Optimizer (any transformers optimizer name)", "training")
    scheduler: str = P("linear", "Learning-rate scheduler (linear, cosine, constant, ...)", "training")
    weight_decay: float = P(0.0, "Weight decay", "training", ge=0)
    max_grad_norm: float = P(1.0, "Max gradient norm for clipping", "training", ge=0)
    seed: int = P(42, "Random seed", "training")
    max_steps: int = P(-1, "Stop after this many optimizer steps (-1: run all epochs)", "training")

    # --- checkpointing and evaluation --------------------------------------------------------
    eval_strategy: Literal["epoch", "steps", "no"] = P("epoch", "When to evaluate (epoch, steps, no)",
                                                       "checkpoint")
    eval_steps: Optional[int] = P(None, "Evaluate every N steps when --eval-strategy steps "
                                  "(default: --save-steps)", "checkpoint", ge=1)
    save_strategy: Literal["epoch", "steps", "no"] = P("epoch", "When to save (epoch, steps, no)",
                                                       "checkpoint")
    save_steps: int = P(500, "Save every N steps (if --save-strategy steps)", "checkpoint", ge=1)
    save_total_limit: int = P(1, "Max checkpoints to keep", "checkpoint", ge=1)
    logging_steps: int = P(-1, "Log every N steps (-1 for auto)", "checkpoint")
    resume_from_checkpoint: Optional[str] = P(
        None, "Resume from a checkpoint directory, or 'auto' for the last one in --project-name",
        "checkpoint")

    # --- performance and memory --------------------------------------------------------------
    auto_find_batch_size: bool = P(False, "Find the largest batch size that fits (up to batch x "
                                   "accumulation, keeping their product) from the memory estimate",
                                   "performance")
    max_memory_gb: Optional[float] = P(None, "Memory budget in GiB for the pre-run estimate and "
                                       "--auto-find-batch-size (default: the free RAM / GPU memory)",
                                       "performance", gt=0)
    memory_check: bool = P(True, "Refuse a run whose estimated peak memory exceeds the memory available "
                           "(--no-memory-check starts it anyway)", "performance")
    disable_gradient_checkpointing: bool = P(False, "Disable gradient checkpointing (memory optimization)",
                                             "performance")
    unsloth: bool = P(False, "Use Unsloth for faster training (SFT only; llama/mistral/gemma/qwen2)",
                      "performance")
    use_sharegpt_mapping: bool = P(False, "Use Unsloth's ShareGPT mapping", "performance")
    use_flash_attention_2: bool = P(False, "Use Flash Attention 2 for faster training", "performance")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = P(
        None, "Attention implementation (eager, sdpa, flash_attention_2)", "performance")
    rope_scaling: Optional[Literal["linear", "dynamic", "yarn", "llama3"]] = P(
        None, "RoPE scaling to stretch the context beyond the model's (factor from --block-size)",
        "performance")
    trust_remote_code: bool = P(False, "Allow the model repository's own Python code to run "
                                "(only for models you trust)", "performance")
    liger_kernel: bool = P(False, "Liger Triton kernels (fused RMSNorm, RoPE, SwiGLU, linear+cross-entropy); "
                           "CUDA only, pip install liger-kernel", "performance")
    chunked_ce: Optional[bool] = P(None, "Cross-entropy over sequence chunks so the full logits never exist at "
                                   "once (unset: on for vocabularies of 100k tokens and more)", "performance")
    neftune_noise_alpha: Optional[float] = P(None, "NEFTune: noise added to the embeddings while training "
                                             "(e.g. 5)", "performance", gt=0)
    optim_target_modules: Optional[str] = P(None, "Modules GaLore/APOLLO project (comma-separated, or "
                                            "all-linear; default all-linear)", "performance")
    optim_args: Optional[str] = P(None, "Extra optimizer arguments, e.g. rank=64,update_proj_gap=200,scale=0.25 "
                                  "for GaLore/APOLLO", "performance")
    badam_switch_interval: int = P(50, "BAdam: steps before switching to the next block of layers",
                                   "performance", ge=1)

    # --- backend and distribution ------------------------------------------------------------
    backend: Literal["local", "spaces"] = P("local", "Where to run (local, spaces)", "backend")
    distributed_backend: Optional[Literal["ddp", "deepspeed", "fsdp"]] = P(
        None, "Distribution backend: ddp, deepspeed (ZeRO) or fsdp (FSDP2); several GPUs without it "
        "use DDP", "backend")
    num_processes: Optional[int] = P(
        None, "Training processes in all (one per device; default: every visible GPU, or one process "
        "on a CPU; 2+ on a CPU trains over gloo)", "backend", ge=1)
    devices: Optional[str] = P(None, "GPUs to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES; default: all "
                               "visible)", "backend")
    num_machines: int = P(1, "Machines (nodes) taking part in the run", "backend", ge=1)
    machine_rank: int = P(0, "Rank of this machine (0 on the main machine)", "backend", ge=0)
    main_process_ip: Optional[str] = P(None, "IP address of the main machine (needed with several "
                                       "machines)", "backend")
    main_process_port: Optional[int] = P(None, "Port on the main machine (default: a free port on one "
                                         "machine, 29500 on several)", "backend", ge=0, le=65535)
    deepspeed_stage: int = P(3, "DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also "
                             "the parameters", "backend", ge=2, le=3)
    deepspeed_offload: Optional[Literal["cpu", "nvme"]] = P(
        None, "DeepSpeed offload of optimizer state (and parameters with ZeRO-3): cpu or nvme", "backend")
    deepspeed_nvme_path: Optional[str] = P(None, "Directory on a fast NVMe disk for "
                                           "--deepspeed-offload nvme", "backend")

    # --- PEFT / LoRA -------------------------------------------------------------------------
    peft: bool = P(False, "Enable LoRA training (same as --finetuning-type lora)", "peft")
    finetuning_type: Literal["full", "freeze", "lora"] = P(
        "full", "Fine-tuning method: full, freeze (train some layers) or lora", "peft")
    lora_r: int = P(16, "LoRA rank", "peft", ge=1)
    lora_alpha: int = P(32, "LoRA alpha", "peft", ge=1)
    lora_dropout: float = P(0.05, "LoRA dropout", "peft", ge=0, lt=1)
    target_modules: str = P("all-linear", "Modules to adapt: all-linear or a comma-separated list "
                            "(q_proj,v_proj,...)", "peft")
    quantization: Optional[Literal["int4", "int8"]] = P(None, "int4/int8 quantization (QLoRA)", "peft")
    quantization_method: Literal["bitsandbytes", "hqq"] = P("bitsandbytes", "Quantization library for "
                                                             "--quantization (bitsandbytes, hqq)", "peft")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = P("nf4", "4-bit data type (nf4, fp4)", "peft")
    double_quantization: bool = P(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit "
                                  "per weight)", "peft")
    compute_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = P(
        None, "Compute dtype of the quantized layers (default: the run's dtype)", "peft")
    use_rslora: bool = P(False, "rsLoRA: scale by alpha/sqrt(r) instead of alpha/r (stable at high rank)",
                         "peft")
    use_dora: bool = P(False, "DoRA: weight-decomposed LoRA (magnitude and direction)", "peft")
    pissa_init: bool = P(False, "PiSSA: start LoRA from the principal singular vectors (saved as a plain "
                         "LoRA)", "peft")
    loraplus_lr_ratio: Optional[float] = P(None, "LoRA+: the B matrices learn at lr x this ratio (e.g. 16)",
                                           "peft", gt=0)
    additional_target: Optional[str] = P(None, "Extra modules trained fully and saved with the adapter "
                                         "(comma-separated, e.g. embed_tokens,lm_head)", "peft")
    create_new_adapter: bool = P(False, "With --adapter-path: merge that adapter into the base and train a "
                                 "new one on top", "peft")
    merge_adapter: bool = P(True, "Also save the LoRA adapter merged into the base model", "peft")
    adapter_path: Optional[str] = P(None, "Continue training an existing LoRA adapter (a run directory or "
                                    "adapter folder) instead of starting a new one", "peft")

    # --- freeze ------------------------------------------------------------------------------
    freeze_trainable_layers: int = P(2, "Trainable layers: N > 0 trains the last N, N < 0 the first -N",
                                     "freeze")
    freeze_trainable_modules: str = P("all", "Sub-modules of the trainable layers to train "
                                      "(comma-separated, e.g. mlp,self_attn; all)", "freeze")
    freeze_extra_modules: Optional[str] = P(None, "Extra modules outside the layers to train "
                                            "(comma-separated, e.g. embed_tokens,norm)", "freeze")

    # --- data processing ---------------------------------------------------------------------
    text_column: str = P("text", "Text column name (the chosen answer for DPO/ORPO)", "data")
    block_size: int = P(-1, "Max sequence length in tokens (-1: the model's, capped by "
                        "--model-max-length); --cutoff-len is the same", "data", aliases=["cutoff_len"])
    model_max_length: int = P(2048, "Maximum model input length", "data", ge=1)
    padding: Literal["left", "right"] = P("right", "Padding side (left or right)", "data")
    add_eos_token: bool = P(True, "Append the EOS token to each example", "data")
    chat_template: Optional[str] = P(
        None, "Chat template: a name from templates/ (gemma, llama3, chatml, ...), tokenizer (the "
        "model's own), none (plain text); default: the model's own, else its family's", "data")
    packing: Optional[bool] = P(None, "Enable sequence packing", "data")
    neat_packing: bool = P(False, "Pack without attention across examples (position ids restart per "
                           "example)", "data")
    group_by_length: bool = P(False, "Batch examples of similar length together (less padding; when not "
                              "packing)", "data")
    auto_convert_dataset: bool = P(False, "Auto-detect and convert the dataset format", "data")
    max_samples: Optional[int] = P(None, "Limit each dataset to N records (for testing)", "data", ge=1)
    column_mapping: Optional[dict[str, str]] = P(
        None, "Column mapping as JSON, e.g. {\"prompt\": \"question\", \"response\": \"answer\"}", "data")
    val_size: float = P(0.0, "Hold out this fraction (0-1) or number (>=1) of training records for "
                        "validation when there is no --valid-split", "data", ge=0)
    train_on_prompt: bool = P(False, "Also train on prompt tokens (default: only the answers)", "data")
    mask_history: bool = P(False, "Train only on the last turn of multi-turn conversations", "data")
    dataset_dir: Optional[str] = P(None, "Directory holding dataset_info.json (default: the built-in "
                                   "data/ directory)", "data")
    identity_name: str = P("AITraining Assistant", "Fills {{name}} in the identity dataset", "data")
    identity_author: str = P("AITraining", "Fills {{author}} in the identity dataset", "data")

    # --- preference (DPO / ORPO) -------------------------------------------------------------
    prompt_text_column: Optional[str] = P(None, "Prompt column (DPO/ORPO)", "preference")
    rejected_text_column: Optional[str] = P(None, "Rejected answer column (DPO/ORPO)", "preference")
    model_ref: Optional[str] = P(None, "Reference model (DPO; PPO's KL reference)", "preference")
    dpo_beta: float = P(0.1, "DPO beta (also ORPO's lambda, SimPO's and KTO's beta)", "preference", gt=0)
    pref_loss: Literal["sigmoid", "hinge", "ipo"] = P("sigmoid", "DPO loss type (sigmoid, hinge, ipo)",
                                                      "preference")
    dpo_label_smoothing: float = P(0.0, "DPO label smoothing (robust to noisy preferences), 0-0.5",
                                   "preference", ge=0, le=0.5)
    pref_ftx: float = P(0.0, "Weight of an SFT loss on the chosen answers added to the DPO loss",
                        "preference", ge=0)
    simpo_gamma: float = P(0.5, "SimPO target reward margin", "preference", ge=0)
    kto_chosen_weight: float = P(1.0, "KTO weight of desirable examples", "preference", gt=0)
    kto_rejected_weight: float = P(1.0, "KTO weight of undesirable examples", "preference", gt=0)
    max_prompt_length: int = P(128, "Maximum prompt length in tokens", "preference", ge=1)
    max_completion_length: Optional[int] = P(None, "Maximum completion length in tokens", "preference",
                                             ge=1)

    # --- distillation ------------------------------------------------------------------------
    use_distillation: bool = P(False, "Train the model to imitate --teacher-model", "distillation")
    teacher_model: Optional[str] = P(None, "Teacher model (required for distillation)", "distillation")
    distill_temperature: float = P(3.0, "Distillation temperature", "distillation", gt=0)
    distill_alpha: float = P(0.7, "Weight of the KL term against cross-entropy (0-1)", "distillation",
                             ge=0, le=1)
    distill_max_teacher_length: int = P(512, "Maximum teacher sequence length", "distillation", ge=1)

    # --- PPO ---------------------------------------------------------------------------------
    rl_gamma: float = P(0.99, "Discount factor", "ppo", ge=0, le=1)
    rl_gae_lambda: float = P(0.95, "GAE lambda", "ppo", ge=0, le=1)
    rl_kl_coef: float = P(0.1, "KL penalty coefficient", "ppo", ge=0)
    rl_value_loss_coef: float = P(1.0, "Value loss coefficient", "ppo", ge=0)
    rl_clip_range: float = P(0.2, "Policy clipping range", "ppo", gt=0)
    rl_value_clip_range: float = P(0.2, "Value clipping range", "ppo", gt=0)
    rl_reward_fn: Optional[str] = P(None, "Reward function (default, length_penalty, correctness, or "
                                    "module:function)", "ppo")
    rl_reward_model_path: Optional[str] = P(None, "Reward model for PPO (from --trainer reward)", "ppo")
    rl_num_ppo_epochs: int = P(4, "PPO epochs per batch", "ppo", ge=1)
    rl_chunk_size: int = P(128, "PPO chunk size", "ppo", ge=1)
    rl_mini_batch_size: int = P(8, "PPO mini-batch size", "ppo", ge=1)
    rl_optimize_device_cache: bool = P(True, "Free device cache between PPO phases", "ppo")
    rl_max_new_tokens: int = P(128, "Max new tokens per rollout", "ppo", ge=1)
    rl_top_k: int = P(50, "Top-k sampling for rollouts", "ppo", ge=0)
    rl_top_p: float = P(1.0, "Top-p sampling for rollouts", "ppo", gt=0, le=1)
    rl_temperature: float = P(1.0, "Sampling temperature for rollouts", "ppo", gt=0)

    # --- logging -----------------------------------------------------------------------------
    log: Literal["wandb", "tensorboard", "none"] = P(
        "wandb", "Experiment tracking: wandb (offline when there is no network), tensorboard, none",
        "logging")
    wandb_visualizer: bool = P(True, "Show the W&B terminal visualizer (--no-wandb-visualizer to hide)",
                               "logging")

    # --- hub ---------------------------------------------------------------------------------
    push_to_hub: bool = P(False, "Push the trained model to the Hugging Face Hub (private repo "
                          "{username}/{project-name})", "hub")
    username: Optional[str] = P(None, "Hugging Face username", "hub")
    token: Optional[SecretStr] = P(None, "Hugging Face token (never written to files or logs; "
                                   "HF_TOKEN works too)", "hub", secret=True)

    # --- sweep -------------------------------------------------------------------------------
    use_sweep: bool = P(False, "Run a hyperparameter sweep", "sweep")
    sweep_backend: Literal["optuna", "random", "grid"] = P("optuna", "Sweep backend", "sweep")
    sweep_n_trials: int = P(10, "Number of sweep trials", "sweep", ge=1)
    sweep_metric: str = P("eval_loss", "Metric to optimize", "sweep")
    sweep_direction: Literal["minimize", "maximize"] = P("minimize", "Optimization direction", "sweep")
    sweep_params: Optional[str] = P(None, "Search space as JSON or YAML (or a .json/.yaml file): a range or "
                                    "a list of choices per parameter, e.g. {\"lr\": {\"low\": 1e-5, \"high\": "
                                    "1e-3, \"log\": true}, \"lora_r\": [8, 16]}", "sweep")

    # --- enhanced evaluation -----------------------------------------------------------------
    use_enhanced_eval: bool = P(False, "Compute extra evaluation metrics", "eval")
    eval_metrics: str = P("perplexity", "Comma-separated metrics: perplexity,bleu,rouge,accuracy", "eval")
    eval_save_predictions: bool = P(False, "Save generated predictions during evaluation", "eval")
    eval_batch_size: int = P(8, "Evaluation batch size", "eval", ge=1)
    eval_max_new_tokens: int = P(128, "Max new tokens per generated answer (enhanced eval and the "
                                 "post-training check)", "eval", ge=1)
    post_train_check: bool = P(True, "After SFT, generate on a few validation prompts into samples.jsonl and "
                               "warn when answers do not stop or the saved chat template differs", "eval")
    curriculum: Optional[str] = P(None, "Curriculum learning: order training examples easy to hard by "
                                  "'length' (tokens) or a numeric data column", "data")
    curriculum_epochs: int = P(1, "Epochs in curriculum order (easy to hard); later epochs are shuffled",
                               "data", ge=1)

    # ------------------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        """Aliases and equivalent spellings, resolved before field validation."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "cutoff_len" in data:
            if "block_size" in data and data["block_size"] != data["cutoff_len"]:
                raise ValueError("cutoff_len and block_size are the same setting; give only one")
            data["block_size"] = data.pop("cutoff_len")
        for key in ("mixed_precision", "attn_implementation", "distributed_backend", "quantization",
                    "chat_template", "rope_scaling", "adapter_path", "compute_dtype"):
            if isinstance(data.get(key), str) and data[key].strip().lower() in ("", "null"):
                data[key] = None
        for key in ("mixed_precision", "attn_implementation", "distributed_backend", "quantization",
                    "rope_scaling", "compute_dtype"):
            if isinstance(data.get(key), str) and data[key].lower() in ("none", "no", "fp32"):
                data[key] = None
        if isinstance(data.get("column_mapping"), str):
            try:
                data["column_mapping"] = json.loads(data["column_mapping"]) if data["column_mapping"] else None
            except json.JSONDecodeError as e:
                raise ValueError(f"column_mapping is not valid JSON ({e.msg}); "
                                 'write it like {"prompt": "question"}') from None
        # --peft and --finetuning-type lora are one choice; keep the two fields consistent.
        ft, peft = data.get("finetuning_type"), data.get("peft")
        if ft is None:
            data["finetuning_type"] = "lora" if peft else "full"
        elif ft == "lora":
            data["peft"] = True
        elif peft:
            raise ValueError(f"--peft means LoRA but --finetuning-type is '{ft}'; drop --peft "
                             "or use --finetuning-type lora")
        if data.get("use_distillation") and data.get("trainer", "default") in ("default", "sft", "generic"):
            data["trainer"] = "distillation"
        return data

    @field_validator("sweep_params")
    @classmethod
    def _json_space(cls, v: Optional[str]) -> Optional[str]:
        if v:
            from core.sweep import parse_space

            from core.errors import ConfigError

            try:
                parse_space(v)  # JSON or YAML text, or a .json/.yaml file; errors name the bad entry
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _rules(self) -> "LLMTrainingParams":
        """Cross-field rules: combinations that cannot run, rejected before any compute."""
        stage = self.stage
        if stage in ("dpo", "orpo") and not _names_registered_datasets(self):
            missing = [f"--{f.replace('_', '-')}" for f in ("prompt_text_column", "rejected_text_column")
                       if not getattr(self, f)]
            if missing:
                raise ValueError(f"{self.trainer.upper()} needs {' and '.join(missing)} (and --text-column "
                                 "for the chosen answer), e.g. --prompt-text-column prompt --text-column "
                                 "chosen --rejected-text-column rejected")
        if stage == "ppo" and not (self.rl_reward_model_path or self.rl_reward_fn or self.model_ref):
            raise ValueError("PPO needs a reward: pass --rl-reward-model-path (train one with "
                             "--trainer reward), --rl-reward-fn (a built-in or module:function) or --model-ref")
        if stage == "distillation" and not self.teacher_model:
            raise ValueError("distillation needs --teacher-model")
        if self.unsloth and stage != "sft":
            raise ValueError(f"--unsloth works only with --trainer sft/default, not '{self.trainer}'; "
                             "drop --unsloth")
        if self.quantization and self.finetuning_type != "lora":
            raise ValueError("--quantization trains a LoRA adapter on a quantized model (QLoRA): add --peft")
        if self.adapter_path and self.finetuning_type != "lora":
            raise ValueError("--adapter-path continues a LoRA adapter: add --peft")
        _efficiency_rules(self)
        if (self.packing or self.neat_packing) and self.block_size <= 0:
            raise ValueError("--packing needs a block size: pass --block-size N (e.g. 1024)")
        if self.valid_split and self.val_size:
            raise ValueError("give either --valid-split (a separate file) or --val-size (a held-out part "
                             "of the training data), not both")
        if self.push_to_hub and not self.username:
            raise ValueError("--push-to-hub needs --username (the repo is {username}/{project-name})")
        return self

    @model_validator(mode="after")
    def _distributed_rules(self) -> "LLMTrainingParams":
        """Distribution settings that cannot work together."""
        ds = self.distributed_backend == "deepspeed"
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"--machine-rank {self.machine_rank} must be below --num-machines {self.num_machines}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("several machines need --main-process-ip (the address of machine rank 0)")
        if self.deepspeed_offload and not ds:
            raise ValueError("--deepspeed-offload needs --distributed-backend deepspeed")
        if self.deepspeed_offload == "nvme" and not self.deepspeed_nvme_path:
            raise ValueError("--deepspeed-offload nvme needs --deepspeed-nvme-path (a directory on the NVMe disk)")
        if ds and "layerwise" in self.optimizer:
            raise ValueError(f"--optimizer {self.optimizer} updates layer by layer, which DeepSpeed cannot "
                             "shard; use a non-layerwise optimizer or --distributed-backend ddp")
        if self.quantization and self.distributed_backend in ("deepspeed", "fsdp") and \
                (self.distributed_backend == "fsdp" or self.deepspeed_stage == 3):
            raise ValueError("QLoRA (--quantization) cannot shard quantized weights here; use "
                             "--distributed-backend ddp or --deepspeed-stage 2")
        if self.stage == "reward" and (self.distributed_backend == "fsdp" or (ds and self.deepspeed_stage == 3)):
            raise ValueError("--trainer reward saves its score head from a whole model; shard with "
                             "--deepspeed-stage 2 or use --distributed-backend ddp")
        if self.stage == "ppo" and (self.distributed_backend or (self.num_processes or 1) > 1):
            raise ValueError("--trainer ppo runs its own loop on one device; drop --distributed-backend "
                             "and --num-processes")
        return self

    # ------------------------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        """The stage this run executes (default/sft/generic all map to 'sft')."""
        return TRAINER_STAGE[self.trainer]

    def explicit(self) -> dict[str, Any]:
        """The parameters given explicitly (not left at their default)."""
        return {k: getattr(self, k) for k in self.model_fields_set}


EXTRA_OPTIMIZERS = {"adam_mini": "adam-mini", "badam": "badam"}  # ours (not transformers'): name -> pip


def _efficiency_rules(p: LLMTrainingParams) -> None:
    """Optimizer/scheduler names and the LoRA-family combinations that cannot run."""
    if p.optimizer not in ("adamw_torch", "sgd") or p.scheduler not in ("linear", "cosine", "constant"):
        # transformers is imported only for names off the common path (it takes seconds)
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        optimizers = [o.value for o in OptimizerNames] + list(EXTRA_OPTIMIZERS)
        if p.optimizer not in optimizers:
            raise ValueError(f"--optimizer {p.optimizer!r} is unknown. Choose one of: {', '.join(optimizers)}")
        schedulers = [s.value for s in SchedulerType]
        if p.scheduler not in schedulers:
            raise ValueError(f"--scheduler {p.scheduler!r} is unknown. Choose one of: {', '.join(schedulers)}")
    lora_only = [f for f in ("use_rslora", "use_dora", "pissa_init", "loraplus_lr_ratio", "additional_target",
                             "create_new_adapter") if getattr(p, f)]
    if lora_only and p.finetuning_type != "lora":
        raise ValueError(f"--{lora_only[0].replace('_', '-')} is a LoRA option: add --peft")
    if p.create_new_adapter and not p.adapter_path:
        raise ValueError("--create-new-adapter stacks a new adapter on --adapter-path: give --adapter-path")
    if p.pissa_init and p.adapter_path and not p.create_new_adapter:
        raise ValueError("--pissa-init initialises a new adapter; drop it when continuing --adapter-path")
    if p.pissa_init and p.quantization:
        raise ValueError("--pissa-init needs the full-precision weights (it rewrites them); drop --quantization")
    if p.quantization_method == "hqq" and p.quantization is None:
        raise ValueError("--quantization-method hqq needs --quantization int4 or int8")
    if p.optimizer.startswith(("galore", "apollo")) and p.finetuning_type == "lora":
        raise ValueError(f"--optimizer {p.optimizer} projects the gradients of full weight matrices; use it "
                         "with --finetuning-type full or freeze, not LoRA")
    if p.optimizer == "badam" and p.finetuning_type != "full":
        raise ValueError("--optimizer badam trains one block of layers at a time over all weights: use "
                         "--finetuning-type full")
    if p.neat_packing and p.packing is False:
        raise ValueError("--neat-packing is a kind of packing; drop --packing false")


def _names_registered_datasets(p: LLMTrainingParams) -> bool:
    """True when data_path names dataset_info.json entries (their columns come from the registry)."""
    from core import DATA_DIR

    from pathlib import Path

    info = Path(p.dataset_dir or DATA_DIR) / "dataset_info.json"
    try:
        names = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    parts = [s.strip() for s in p.data_path.split(",") if s.strip()]
    return bool(parts) and all(s in names for s in parts)


def field_meta(name: str) -> dict[str, Any]:
    """Group / UI hints of a field (the json_schema_extra given to P)."""
    return dict(LLMTrainingParams.model_fields[name].json_schema_extra or {})


def fields_in_group(group: str) -> list[str]:
    return [n for n in LLMTrainingParams.model_fields if field_meta(n)["group"] == group]


def groups_for(trainer: str) -> list[str]:
    """The help groups that a trainer uses (for `aitraining llm --trainer X --help` and the UI)."""
    stage = TRAINER_STAGE[trainer]
    return [g for g, (_, used_by) in GROUPS.items() if used_by is None or stage in used_by]


def secret_fields() -> list[str]:
    return [n for n in LLMTrainingParams.model_fields if field_meta(n).get("secret")]
