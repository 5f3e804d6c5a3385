"""The schema: seed 000's flags and defaults, YAML round trips, and the cross-field rules."""
import pytest
import yaml

from core import config_io
from core.cli import parse_llm, make_params
from core.errors import ConfigError
from core.params import LLMTrainingParams

# (flag, field, seed default) for every row of seed 000's parameter tables.
SEED_FLAGS = [
    ("--model", "model", "google/gemma-3-270m"), ("--data-path", "data_path", "data"),
    ("--project-name", "project_name", "project-name"), ("--train-split", "train_split", "train"),
    ("--valid-split", "valid_split", None),
    ("--trainer", "trainer", "default"), ("--epochs", "epochs", 1), ("--batch-size", "batch_size", 2),
    ("--lr", "lr", 3e-5), ("--mixed-precision", "mixed_precision", None),
    ("--gradient-accumulation", "gradient_accumulation", 4), ("--warmup-ratio", "warmup_ratio", 0.1),
    ("--optimizer", "optimizer", "adamw_torch"), ("--scheduler", "scheduler", "linear"),
    ("--weight-decay", "weight_decay", 0.0), ("--max-grad-norm", "max_grad_norm", 1.0), ("--seed", "seed", 42),
    ("--eval-strategy", "eval_strategy", "epoch"), ("--save-strategy", "save_strategy", "epoch"),
    ("--save-steps", "save_steps", 500), ("--save-total-limit", "save_total_limit", 1),
    ("--logging-steps", "logging_steps", -1),
    ("--auto-find-batch-size", "auto_find_batch_size", False),
    ("--disable-gradient-checkpointing", "disable_gradient_checkpointing", False),
    ("--unsloth", "unsloth", False), ("--use-sharegpt-mapping", "use_sharegpt_mapping", False),
    ("--use-flash-attention-2", "use_flash_attention_2", False),
    ("--attn-implementation", "attn_implementation", None),
    ("--backend", "backend", "local"), ("--distributed-backend", "distributed_backend", None),
    ("--peft", "peft", False), ("--lora-r", "lora_r", 16), ("--lora-alpha", "lora_alpha", 32),
    ("--lora-dropout", "lora_dropout", 0.05), ("--target-modules", "target_modules", "all-linear"),
    ("--quantization", "quantization", None), ("--merge-adapter", "merge_adapter", True),
    ("--text-column", "text_column", "text"), ("--block-size", "block_size", -1),
    ("--model-max-length", "model_max_length", 2048), ("--padding", "padding", "right"),
    ("--add-eos-token", "add_eos_token", True), ("--chat-template", "chat_template", None),
    ("--packing", "packing", None), ("--auto-convert-dataset", "auto_convert_dataset", False),
    ("--max-samples", "max_samples", None),
    ("--prompt-text-column", "prompt_text_column", None), ("--rejected-text-column", "rejected_text_column", None),
    ("--dpo-beta", "dpo_beta", 0.1), ("--model-ref", "model_ref", None),
    ("--teacher-model", "teacher_model", None), ("--use-distillation", "use_distillation", False),
    ("--distill-temperature", "distill_temperature", 3.0), ("--distill-alpha", "distill_alpha", 0.7),
    ("--distill-max-teacher-length", "distill_max_teacher_length", 512),
    ("--log", "log", "wandb"), ("--no-wandb-visualizer", "wandb_visualizer", True),
    ("--push-to-hub", "push_to_hub", False), ("--username", "username", None), ("--token", "token", None),
    ("--use-sweep", "use_sweep", False), ("--sweep-backend", "sweep_backend", "optuna"),
    ("--sweep-n-trials", "sweep_n_trials", 10),
    ("--use-enhanced-eval", "use_enhanced_eval", False), ("--eval-metrics", "eval_metrics", "perplexity"),
    ("--rl-reward-model-path", "rl_reward_model_path", None),
]

# A non-default value for each flag, and what the field must hold after parsing.
SAMPLE = {
    "model": ("./m", "./m"), "data_path": ("d.jsonl", "d.jsonl"), "project_name": ("out", "out"),
    "train_split": ("tr", "tr"), "valid_split": ("va", "va"), "trainer": ("sft", "sft"), "epochs": ("3", 3),
    "batch_size": ("4", 4), "lr": ("1e-4", 1e-4), "mixed_precision": ("bf16", "bf16"),
    "gradient_accumulation": ("2", 2), "warmup_ratio": ("0.05", 0.05), "optimizer": ("sgd", "sgd"),
    "scheduler": ("cosine", "cosine"), "weight_decay": ("0.01", 0.01), "max_grad_norm": ("0.5", 0.5),
    "seed": ("7", 7), "eval_strategy": ("steps", "steps"), "save_strategy": ("steps", "steps"),
    "save_steps": ("10", 10), "save_total_limit": ("3", 3), "logging_steps": ("5", 5),
    "attn_implementation": ("eager", "eager"), "distributed_backend": ("ddp", "ddp"),
    "lora_r": ("8", 8), "lora_alpha": ("16", 16), "lora_dropout": ("0.1", 0.1),
    "target_modules": ("q_proj,v_proj", "q_proj,v_proj"), "text_column": ("body", "body"),
    "block_size": ("256", 256), "model_max_length": ("4096", 4096), "padding": ("left", "left"),
    "chat_template": ("chatml", "chatml"), "max_samples": ("16", 16), "dpo_beta": ("0.2", 0.2),
    "model_ref": ("./ref", "./ref"), "teacher_model": ("./t", "./t"), "distill_temperature": ("2.0", 2.0),
    "distill_alpha": ("0.5", 0.5), "distill_max_teacher_length": ("256", 256), "log": ("none", "none"),
    "username": ("me", "me"), "sweep_backend": ("random", "random"), "sweep_n_trials": ("3", 3),
    "eval_metrics": ("bleu", "bleu"), "prompt_text_column": ("p", "p"), "rejected_text_column": ("r", "r"),
    "rl_reward_model_path": ("./rm", "./rm"), "backend": ("spaces", "spaces"), "quantization": ("int4", "int4"),
}


@pytest.mark.parametrize("flag,field,default", SEED_FLAGS)
def test_seed_flag_default_and_parse(flag, field, default):
    assert LLMTrainingParams.model_fields[field].default == default
    assert getattr(LLMTrainingParams(), field) == default or field == "finetuning_type"
    if field == "wandb_visualizer":
        _, given = parse_llm([flag])
        assert given == {"wandb_visualizer": False}
    elif isinstance(default, bool) or field == "packing":
        _, given = parse_llm([flag])
        assert given[field] is True
    elif field == "token":
        _, given = parse_llm([flag, "hf_abc"])
        assert make_params(None, given).token.get_secret_value() == "hf_abc"
    else:
        text, value = SAMPLE[field]
        _, given = parse_llm([flag, text])
        assert given[field] == value


def test_aliases_cutoff_len_and_peft():
    _, given = parse_llm(["--cutoff-len", "128", "--peft"])
    p = make_params(None, given)
    assert p.block_size == 128 and p.finetuning_type == "lora" and p.peft
    p = LLMTrainingParams(finetuning_type="lora")
    assert p.peft is True
    assert LLMTrainingParams(finetuning_type="freeze").peft is False


def test_trainer_aliases_map_to_one_stage():
    assert {LLMTrainingParams(trainer=t).stage for t in ("default", "sft", "generic")} == {"sft"}


def test_none_spelling_for_optional_choice():
    _, given = parse_llm(["--mixed-precision", "none"])
    assert make_params(None, given).mixed_precision is None


def test_yaml_round_trip_is_byte_exact():
    p = LLMTrainingParams(model="./m", data_path="identity", project_name="out", trainer="sft", peft=True,
                          lora_r=8, column_mapping={"prompt": "q"}, block_size=256, val_size=0.1)
    text = config_io.dumps(p)
    again = config_io.loads(text)
    assert again == p
    assert config_io.dumps(again) == text


def test_yaml_has_seed_shape_and_no_secret():
    p = LLMTrainingParams(model="m", peft=True, token="hf_supersecret", username="me", text_column="chosen")
    doc = yaml.safe_load(config_io.dumps(p))
    assert list(doc) == ["task", "backend", "base_model", "project_name", "log", "data", "params", "hub"]
    assert doc["task"] == "llm-default" and doc["base_model"] == "m"
    assert doc["data"]["column_mapping"]["text_column"] == "chosen"
    assert doc["params"]["peft"] is True and doc["hub"]["username"] == "me"
    assert "hf_supersecret" not in config_io.dumps(p)


def test_seed_004_yaml_loads():
    text = """
task: llm-sft
backend: local
base_model: meta-llama/Llama-3.2-3B
project_name: distributed-model
data:
  path: ./data
  train_split: train
  valid_split: null
  chat_template: tokenizer
  column_mapping:
    text_column: text
log: wandb
params:
  distributed_backend: deepspeed
  epochs: 3
  batch_size: 2
  gradient_accumulation: 4
  mixed_precision: bf16
  peft: true
  lora_r: 16
"""
    p = config_io.loads(text)
    assert (p.trainer, p.model, p.distributed_backend, p.epochs, p.peft, p.chat_template) == (
        "sft", "meta-llama/Llama-3.2-3B", "deepspeed", 3, True, "tokenizer")


@pytest.mark.parametrize("doc,fragment", [
    ({"params": {"lrr": 1e-4}}, "unknown parameter 'lrr' (did you mean 'lr'?)"),
    ({"paramz": {}}, "unknown top-level key(s) paramz (did you mean 'params'?)"),
    ({"data": {"pth": "x"}}, "unknown key data.pth (did you mean 'path'?)"),
    ({"params": {"batch_size": 0}}, "batch_size (--batch-size) = 0"),
    ({"params": {"lr": -1}}, "lr (--lr) = -1"),
    ({"params": {"epochs": "many"}}, "epochs (--epochs) = 'many'"),
    ({"task": "image-classification"}, "not an LLM task"),
    ({"task": "llm-ppo"}, "--rl-reward-model-path"),
    ({"task": "llm-dpo", "data": {"path": "prefs.jsonl"}}, "DPO needs --prompt-text-column and --rejected-text-column"),
    ({"task": "llm-orpo", "data": {"path": "p.jsonl", "column_mapping": {"prompt_text_column": "p"}}},
     "ORPO needs --rejected-text-column"),
    ({"task": "llm-distillation"}, "distillation needs --teacher-model"),
    ({"params": {"packing": True}}, "--packing needs a block size"),
    ({"params": {"quantization": "int4"}}, "QLoRA"),
    ({"params": {"peft": True, "finetuning_type": "freeze"}}, "--peft means LoRA"),
    ({"data": {"valid_split": "v"}, "params": {"val_size": 0.1}}, "either --valid-split"),
    ({"hub": {"push_to_hub": True}}, "--push-to-hub needs --username"),
    ({"params": {"column_mapping": "{bad"}}, "column_mapping is not valid JSON"),
])
def test_bad_config_gives_clear_error(doc, fragment):
    with pytest.raises(ConfigError) as e:
        config_io.from_dict(doc, "run.yaml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("run.yaml")


def test_dpo_on_registered_dataset_needs_no_columns():
    p = LLMTrainingParams(trainer="dpo", data_path="demo_preference")
    assert p.stage == "dpo"


def test_ppo_with_reward_model_is_valid():
    assert LLMTrainingParams(trainer="ppo", rl_reward_model_path="./rm").stage == "ppo"
    assert LLMTrainingParams(trainer="ppo", model_ref="./ref").stage == "ppo"
    assert LLMTrainingParams(trainer="ppo", rl_reward_fn="length_penalty").stage == "ppo"


def test_use_distillation_selects_the_stage():
    assert LLMTrainingParams(use_distillation=True, teacher_model="t").stage == "distillation"


def test_bad_yaml_syntax():
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_io.loads("params: [unclosed", "x.yaml")


@pytest.mark.parametrize("kw", [
    {}, {"peft": True, "lora_r": 8, "token": "hf_x"}, {"finetuning_type": "freeze", "freeze_trainable_layers": -1},
    {"column_mapping": {"prompt": "q"}, "mixed_precision": "bf16", "merge_adapter": False, "block_size": 64},
    {"trainer": "dpo", "prompt_text_column": "p", "rejected_text_column": "r", "dpo_beta": 0.3},
])
def test_command_line_rebuilds_the_params(kw):
    from core.cli import to_cli_args

    p = LLMTrainingParams(**kw)
    args = to_cli_args(p)
    if "token" in kw:
        assert "hf_x" not in args and "***" in args
        args[args.index("***")] = "hf_x"
    _, given = parse_llm(args)
    assert make_params(None, given) == p
