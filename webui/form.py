"""The training form, generated from core/params.py.

Each schema field becomes one widget (bool -> checkbox, choice -> dropdown, number -> number box,
text -> textbox); its label and help come from the locales and the schema's description, its
default and choices from the schema. values_to_params / params_to_values convert between the
widgets' values and LLMTrainingParams, so the form, the CLI and the YAML cannot disagree.
"""
from __future__ import annotations

import typing
from typing import Any

import gradio as gr

from core import config_io
from core.params import LLMTrainingParams, field_meta, fields_in_group
from webui.i18n import field_info, field_label

FIELDS = LLMTrainingParams.model_fields
# Placed by the page layout (top bar and the train tab's main area); the rest go to accordions.
TOP_FIELDS = ["model", "finetuning_type", "adapter_path", "quantization", "chat_template", "rope_scaling"]
MAIN_FIELDS = ["trainer", "dataset_dir", "data_path", "lr", "epochs", "max_grad_norm", "max_samples",
               "mixed_precision", "block_size", "batch_size", "gradient_accumulation", "val_size",
               "scheduler", "project_name", "distributed_backend", "devices", "num_processes", "deepspeed_stage"]
# `peft` is the CLI's spelling of finetuning_type=lora: the method dropdown is its one control here.
NOT_IN_FORM = {"peft"}
AUTO = "auto"  # chat_template: unset
NONE = "none"  # any optional choice: unset
METHODS = ["full", "freeze", "lora", "qlora"]  # qlora = lora + --quantization (int4 unless chosen)


def accordion_fields(group: str) -> list[str]:
    placed = set(TOP_FIELDS) | set(MAIN_FIELDS) | NOT_IN_FORM
    return [n for n in fields_in_group(group) if n not in placed]


def form_fields() -> list[str]:
    """Every field the form shows, in a fixed order (the order of the value lists)."""
    return [n for n in FIELDS if n not in NOT_IN_FORM]


def _plain(name: str):
    ann = FIELDS[name].annotation
    optional = typing.get_origin(ann) is typing.Union and type(None) in typing.get_args(ann)
    if optional:
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    return ann, optional


_DEFAULTS: dict[str, Any] = {}


def _default_value(name: str) -> Any:
    if not _DEFAULTS:
        _DEFAULTS.update(params_to_values(LLMTrainingParams()))
    return _DEFAULTS[name]


def make_widget(name: str, lang: str = "en", **kw) -> gr.Component:
    """One widget for one schema field; kw overrides (choices, allow_custom_value, ...)."""
    ann, optional = _plain(name)
    choices = kw.pop("choices", None)
    common = dict(label=field_label(name, lang), info=field_info(name, lang), value=_default_value(name),
                  elem_id=f"field-{name}")
    common.update(kw)
    if ann is bool:
        return gr.Checkbox(**common)
    if typing.get_origin(ann) is typing.Literal or choices is not None:
        choices = choices or list(typing.get_args(ann)) + ([NONE] if optional else [])
        return gr.Dropdown(choices=choices, **common)
    if ann in (int, float) and not optional:
        return gr.Number(precision=0 if ann is int else None, **common)
    if ann in (int, float):  # a number box cannot be empty, and empty means "not set" here
        return gr.Textbox(placeholder=NONE, **common)
    if field_meta(name).get("secret"):
        return gr.Textbox(type="password", **common)
    return gr.Textbox(**common)


def params_to_values(p: LLMTrainingParams) -> dict[str, Any]:
    """Widget values for these parameters."""
    out: dict[str, Any] = {}
    for name in form_fields():
        value = getattr(p, name)
        ann, optional = _plain(name)
        if name == "chat_template":
            value = value or AUTO
        elif name == "finetuning_type" and value == "lora" and p.quantization:
            value = "qlora"
        elif name == "data_path":
            value = [s.strip() for s in value.split(",") if s.strip()]
        elif field_meta(name).get("secret"):
            value = value.get_secret_value() if value is not None else ""
        elif value is None:
            # a checkbox has no "unset": unticked is None (values_to_params maps False back)
            value = NONE if typing.get_origin(ann) is typing.Literal else (False if ann is bool else "")
        elif optional and ann in (int, float):
            value = str(value)
        elif typing.get_origin(ann) is dict:
            import json

            value = json.dumps(value, ensure_ascii=False)
        out[name] = value
    return out


def values_to_params(values: dict[str, Any], source: str = "web form") -> LLMTrainingParams:
    """LLMTrainingParams from widget values; errors are ConfigErrors naming the field."""
    kw: dict[str, Any] = {}
    for name in form_fields():
        if name not in values:
            continue
        value = values[name]
        ann, optional = _plain(name)
        if name == "data_path" and isinstance(value, (list, tuple)):
            value = ",".join(str(v).strip() for v in value if str(v).strip())
        if name == "chat_template" and value == AUTO:
            value = None
        if name == "finetuning_type" and value == "qlora":
            value = "lora"
            kw.setdefault("quantization", values.get("quantization") if values.get("quantization") not in
                          (None, NONE) else "int4")
        # "none" means unset except in free text, where the schema decides what it means
        # (chat_template "none" is plain text, not the model's own template).
        unset = ("",) if ann is str else ("", NONE)
        if isinstance(value, str) and optional and value.strip() in unset:
            value = None
        if ann is bool and optional and value is False:
            value = None  # an unticked optional switch (packing) means "not set", as on the CLI
        if ann is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if name == "quantization" and "quantization" in kw:
            continue
        kw[name] = value
    return config_io.build(kw, source)


def default_values() -> dict[str, Any]:
    return params_to_values(LLMTrainingParams())
