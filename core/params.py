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

    # --- backend and distribution ------------------------------------------------------------
    backend: Literal["local", "spaces"] = P("local", "Where to run (local, spaces)", "backend")
    distributed_backend: Optional[Literal["ddp", "deepspeed"]] = P(
        None, "Distribution backend (ddp, deepspeed); several GPUs without it use DDP", "backend")

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
    sweep_params: Optional[str] = P(None, "Search space as JSON, e.g. "
                                    "{\"lr\": {\"low\": 1e-5, \"high\": 1e-3, \"type\": \"float\"}}", "sweep")

    # --- enhanced evaluation -----------------------------------------------------------------
    use_enhanced_eval: bool = P(False, "Compute extra evaluation metrics", "eval")
    eval_metrics: str = P("perplexity", "Comma-separated metrics: perplexity,bleu,rouge,accuracy", "eval")
    eval_save_predictions: bool = P(False, "Save generated predictions during evaluation", "eval")
    eval_batch_size: int = P(8, "Evaluation batch size", "eval", ge=1)

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
                    "chat_template", "rope_scaling", "adapter_path"):
            if isinstance(data.get(key), str) and data[key].strip().lower() in ("", "null"):
                data[key] = None
        for key in ("mixed_precision", "attn_implementation", "distributed_backend", "quantization",
                    "rope_scaling"):
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
            try:
                json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"sweep_params is not valid JSON ({e.msg})") from None
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
        if self.packing and self.block_size <= 0:
            raise ValueError("--packing needs a block size: pass --block-size N (e.g. 1024)")
        if self.valid_split and self.val_size:
            raise ValueError("give either --valid-split (a separate file) or --val-size (a held-out part "
                             "of the training data), not both")
        if self.push_to_hub and not self.username:
            raise ValueError("--push-to-hub needs --username (the repo is {username}/{project-name})")
        return self

    # ------------------------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        """The stage this run executes (default/sft/generic all map to 'sft')."""
        return TRAINER_STAGE[self.trainer]

    def explicit(self) -> dict[str, Any]:
        """The parameters given explicitly (not left at their default)."""
        return {k: getattr(self, k) for k in self.model_fields_set}


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
