"""The training form: built from the schema for every language and stage, its defaults are the
schema's, and form -> params -> YAML -> params -> form loses nothing (the token aside, which is
never written). Real widgets from build_app; no Gradio server, no mocks."""
import json
import re
from pathlib import Path

import pytest

from core import DATA_DIR, config_io
from core.errors import ConfigError
from core.params import TRAINER_STAGE, LLMTrainingParams
from webui import form
from webui.app import build_app

SCHEMA_DEFAULTS = form.params_to_values(LLMTrainingParams())


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """One page per language, each with its own runs directory."""
    out = {}
    for lang in ("en", "pt", "zh"):
        root = tmp_path_factory.mktemp(f"runs-{lang}")
        out[lang] = (build_app(root, lang), root)
    return out


def widget_values(app) -> dict:
    """What the page's widgets hold before the user touches anything."""
    return {name: comp.value for name, comp in app.ui.fields.items()}


@pytest.mark.parametrize("lang", ["en", "pt", "zh"])
def test_every_field_but_peft_has_a_widget_in_every_language(apps, lang):
    app, _ = apps[lang]
    fields = app.ui.fields
    expected = set(LLMTrainingParams.model_fields) - {"peft"}
    assert set(fields) == expected, (sorted(expected - set(fields)), sorted(set(fields) - expected))
    assert form.form_fields() == [n for n in LLMTrainingParams.model_fields if n != "peft"]
    for name, comp in fields.items():
        assert comp.elem_id == f"field-{name}"
        assert comp.label, f"{name} has no label in {lang}"
    # the page's own starting values form valid parameters as they are
    p = form.values_to_params(widget_values(app))
    assert p.trainer == "default" and p.data_path == "identity"


def test_labels_follow_the_language(apps):
    labels = {lang: apps[lang][0].ui.fields["lr"].label for lang in apps}
    assert len(set(labels.values())) == 3, labels  # en, pt and zh each say it their way


# Companion values each trainer needs to pass the schema's cross-field rules.
COMPANIONS = {
    "dpo": {"prompt_text_column": "prompt", "text_column": "chosen", "rejected_text_column": "rejected",
            "data_path": ["prefs.jsonl"]},
    "orpo": {"data_path": ["demo_preference"]},  # a registered preference set brings its columns
    "ppo": {"rl_reward_model_path": "./runs/reward-model"},
    "distillation": {"teacher_model": "./models/teacher"},
}
NEEDS = {"dpo": "--prompt-text-column", "orpo": "--rejected-text-column", "ppo": "--rl-reward-model-path",
         "distillation": "--teacher-model"}


def test_trainer_dropdown_offers_every_trainer(apps):
    for lang, (app, _) in apps.items():
        offered = [c[1] if isinstance(c, (tuple, list)) else c for c in app.ui.fields["trainer"].choices]
        assert offered == list(TRAINER_STAGE), (lang, offered)


@pytest.mark.parametrize("trainer", list(TRAINER_STAGE))
def test_the_form_builds_for_every_stage(apps, trainer):
    app, _ = apps["en"]
    values = {**widget_values(app), "trainer": trainer, **COMPANIONS.get(trainer, {})}
    p = form.values_to_params(values)
    assert p.trainer == trainer and p.stage == TRAINER_STAGE[trainer]
    for name, value in COMPANIONS.get(trainer, {}).items():
        got = getattr(p, name)
        assert got == (",".join(value) if isinstance(value, list) else value), name
    # and the parameters the form made come back into the form unchanged
    assert form.values_to_params(form.params_to_values(p)) == p


@pytest.mark.parametrize("trainer", sorted(NEEDS))
def test_a_stage_missing_its_companion_value_names_it(apps, trainer):
    app, _ = apps["en"]
    values = {**widget_values(app), "trainer": trainer, "data_path": ["my-data.jsonl"]}
    with pytest.raises(ConfigError, match=re.escape(NEEDS[trainer])):
        form.values_to_params(values)


def test_default_values_are_exactly_the_schema_defaults():
    assert form.values_to_params(form.default_values()) == LLMTrainingParams()
    assert form.default_values() == SCHEMA_DEFAULTS
    # an empty form (nothing sent) is the defaults too
    assert form.values_to_params({}) == LLMTrainingParams()


def test_widget_defaults_equal_the_schema_defaults(apps):
    app, root = apps["en"]
    values = widget_values(app)
    page_set = {"project_name", "dataset_dir", "data_path"}
    for name, value in values.items():
        if name in page_set:
            continue
        if name == "adapter_path":  # a dropdown with nothing chosen: None, where a textbox says ""
            assert value in (None, ""), value
            assert form.values_to_params({name: value}).adapter_path is None
            continue
        assert value == SCHEMA_DEFAULTS[name], f"{name}: widget {value!r} != schema {SCHEMA_DEFAULTS[name]!r}"
    # the page's own starting values: a fresh timestamped run under the runs dir, the built-in
    # dataset registry and its identity dataset (so Start works on a new install)
    assert re.fullmatch(re.escape(str(Path(root).resolve())) + r"/run-\d{8}-\d{6}", values["project_name"]), \
        values["project_name"]
    assert values["dataset_dir"] == str(DATA_DIR)
    assert values["data_path"] == ["identity"]
    registry = json.loads((Path(DATA_DIR) / "dataset_info.json").read_text(encoding="utf-8"))
    assert "identity" in registry


def test_page_uses_the_data_dir_it_is_given(tmp_path):
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}), encoding="utf-8")
    app = build_app(tmp_path / "runs", "en", data_dir=data)
    assert app.ui.fields["dataset_dir"].value == str(data)


ROUND_TRIPS = {
    "lora": dict(finetuning_type="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1,
                 target_modules="q_proj,v_proj", merge_adapter=False, trainer="sft", chat_template="chatml",
                 lr=2e-4, epochs=3, batch_size=4, scheduler="cosine"),
    "freeze": dict(finetuning_type="freeze", freeze_trainable_layers=-1, freeze_trainable_modules="mlp,self_attn",
                   freeze_extra_modules="embed_tokens,norm", warmup_ratio=0.0, weight_decay=0.01),
    "qlora-int8": dict(finetuning_type="lora", quantization="int8", lora_r=4, gradient_accumulation=8),
    "qlora-int4": dict(peft=True, quantization="int4"),
    "column-mapping": dict(data_path="a.jsonl,b.jsonl", column_mapping={"prompt": "question", "response": "answer"},
                           text_column="body", train_split="training", valid_split="dev"),
    "optional-numbers-set": dict(eval_steps=7, max_samples=100, max_completion_length=64, mixed_precision="bf16",
                                 eval_strategy="steps", save_strategy="steps", save_steps=7, block_size=256,
                                 packing=True, rope_scaling="linear", attn_implementation="sdpa"),
    "optional-numbers-unset": dict(eval_steps=None, max_samples=None, max_completion_length=None,
                                   mixed_precision=None, valid_split=None, val_size=0.1),
    "secret": dict(push_to_hub=True, username="me", token="hf_do_not_write_me_123"),
    "preference": dict(trainer="dpo", prompt_text_column="prompt", text_column="chosen",
                       rejected_text_column="rejected", dpo_beta=0.25, max_prompt_length=64, model_ref="./ref"),
    "ppo": dict(trainer="ppo", rl_reward_model_path="./rm", rl_top_p=0.9, rl_reward_fn="length_penalty"),
    "plain-text-template": dict(chat_template="none", train_on_prompt=True, mask_history=True),
    "distillation": dict(use_distillation=True, teacher_model="./teacher", distill_alpha=0.5),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_form_yaml_form_round_trip(case):
    p = LLMTrainingParams(**ROUND_TRIPS[case])
    values = form.params_to_values(p)
    assert form.values_to_params(values) == p, "form -> params lost something"
    text = config_io.dumps(form.values_to_params(values))
    again = form.params_to_values(config_io.loads(text))
    if p.token is not None:  # never written: the launcher passes it through the environment
        secret = p.token.get_secret_value()
        assert values["token"] == secret
        assert secret not in text
        assert not re.search(r"^\s*token:", text, re.M), text
        assert again["token"] == ""
        values = {k: v for k, v in values.items() if k != "token"}
        again = {k: v for k, v in again.items() if k != "token"}
    assert again == values


def test_qlora_method_alone_means_int4_and_shows_as_qlora():
    values = {**form.default_values(), "finetuning_type": "qlora"}  # quantization left at none
    p = form.values_to_params(values)
    assert (p.finetuning_type, p.peft, p.quantization) == ("lora", True, "int4")
    assert form.params_to_values(p)["finetuning_type"] == "qlora"
    p8 = form.values_to_params({**values, "quantization": "int8"})
    assert p8.quantization == "int8"


def test_chat_template_auto_and_none_differ():
    base = form.default_values()
    assert form.values_to_params({**base, "chat_template": form.AUTO}).chat_template is None
    assert form.values_to_params({**base, "chat_template": "none"}).chat_template == "none"  # plain text


def test_number_boxes_send_floats_for_ints():
    # Gradio number boxes may send 4.0 for an integer field
    p = form.values_to_params({**form.default_values(), "batch_size": 4.0, "epochs": 2.0})
    assert p.batch_size == 4 and isinstance(p.batch_size, int) and p.epochs == 2


@pytest.mark.parametrize("name,value,flag", [
    ("batch_size", 0, "--batch-size"),
    ("lr", "abc", "--lr"),
    ("lr", 0, "--lr"),
    ("epochs", 1.5, "--epochs"),
    ("warmup_ratio", 1.0, "--warmup-ratio"),
    ("eval_steps", "x", "--eval-steps"),
    ("max_samples", "0", "--max-samples"),
    ("mixed_precision", "fp8", "--mixed-precision"),
    ("column_mapping", "{not json", "column_mapping"),
])
def test_errors_are_config_errors_naming_the_field(name, value, flag):
    with pytest.raises(ConfigError) as e:
        form.values_to_params({**form.default_values(), name: value})
    msg = str(e.value)
    assert msg.startswith("web form:"), msg
    assert name in msg and flag in msg, msg


def test_cross_field_errors_say_what_to_do():
    values = {**form.default_values(), "finetuning_type": "full", "quantization": "int4"}
    with pytest.raises(ConfigError, match="QLoRA"):
        form.values_to_params(values)
    with pytest.raises(ConfigError, match="--block-size"):
        form.values_to_params({**form.default_values(), "packing": True, "block_size": -1})
