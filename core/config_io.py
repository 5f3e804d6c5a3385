"""YAML in and out, in the shape of the seed's run files:

    task: llm-sft
    backend: local
    base_model: google/gemma-3-270m
    project_name: ./models/my-run
    log: wandb
    data: {path, train_split, valid_split, chat_template, column_mapping: {text_column, ...}}
    params: {every other parameter}
    hub: {push_to_hub, username}

Secrets (the hub token) are never written: the launcher hands them to the run through the
environment. dump(load(text)) == text for every file dump() wrote, so a run directory's
config.yaml replays the run byte for byte.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from core.errors import ConfigError
from core.params import LLMTrainingParams, secret_fields

TOP_KEYS = ("task", "backend", "base_model", "project_name", "log", "data", "params", "hub")
# Fields that live outside `params:` (top level, data:, hub:); every other field goes to params.
_TOP = {"backend": "backend", "base_model": "model", "project_name": "project_name", "log": "log"}
_DATA = {"path": "data_path", "train_split": "train_split", "valid_split": "valid_split",
         "chat_template": "chat_template"}
_COLUMNS = ("text_column", "prompt_text_column", "rejected_text_column")
_HUB = ("push_to_hub", "username")


def to_dict(p: LLMTrainingParams) -> dict[str, Any]:
    """The YAML document for these parameters (all of them, in schema order)."""
    values = p.model_dump(mode="json")
    for s in secret_fields():
        values.pop(s, None)
    doc: dict[str, Any] = {"task": f"llm-{values.pop('trainer')}"}
    for key, field in _TOP.items():
        doc[key] = values.pop(field)
    data = {key: values.pop(field) for key, field in _DATA.items()}
    columns = {c: values.pop(c) for c in _COLUMNS}
    columns.update(values.pop("column_mapping") or {})
    data["column_mapping"] = columns
    doc["data"] = data
    hub = {k: values.pop(k) for k in _HUB}
    doc["params"] = values
    doc["hub"] = hub
    return doc


def from_dict(doc: Any, source: str = "config") -> LLMTrainingParams:
    """Parameters from a YAML document; every mistake is a ConfigError naming the key and fix."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(map(str, unknown))}"
                          f"{_suggest(unknown[0], TOP_KEYS)}; allowed: {', '.join(TOP_KEYS)}")
    kw: dict[str, Any] = {}
    for section in ("data", "params", "hub"):
        if doc.get(section) is not None and not isinstance(doc[section], dict):
            raise ConfigError(f"{source}: '{section}' must be a mapping")
    params = dict(doc.get("params") or {})
    if "trainer" in params and "task" in doc:
        raise ConfigError(f"{source}: give the trainer once, as task: llm-<trainer>, not also in params")
    task = doc.get("task")
    if task is not None:
        if not (isinstance(task, str) and (task == "llm" or task.startswith("llm-"))):
            raise ConfigError(f"{source}: task '{task}' is not an LLM task; use llm-sft, llm-dpo, ...")
        if task != "llm":
            kw["trainer"] = task[len("llm-"):]
    for key, field in _TOP.items():
        if key in doc:
            kw[field] = doc[key]
    data = dict(doc.get("data") or {})
    columns = data.pop("column_mapping", None) or {}
    if not isinstance(columns, dict):
        raise ConfigError(f"{source}: data.column_mapping must be a mapping")
    for key in list(data):
        if key not in _DATA:
            raise ConfigError(f"{source}: unknown key data.{key}{_suggest(key, _DATA)}; "
                              f"allowed: {', '.join(_DATA)}, column_mapping")
        kw[_DATA[key]] = data[key]
    extra_columns = {k: v for k, v in columns.items() if k not in _COLUMNS}
    kw.update({k: v for k, v in columns.items() if k in _COLUMNS})
    for key, value in (doc.get("hub") or {}).items():
        kw[key] = value
    if "column_mapping" in params:
        mapping = build({"column_mapping": params.pop("column_mapping")}, source).column_mapping
        extra_columns = {**(mapping or {}), **extra_columns}
    kw["column_mapping"] = extra_columns or None
    overlap = set(params) & set(kw) - {"column_mapping"}
    if overlap:
        raise ConfigError(f"{source}: {', '.join(sorted(overlap))} given twice (in params and in "
                          "its own section)")
    kw.update(params)
    return build(kw, source)


def build(kw: dict[str, Any], source: str = "parameters") -> LLMTrainingParams:
    """LLMTrainingParams(**kw) with pydantic's errors rewritten for people."""
    try:
        return LLMTrainingParams(**kw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def format_validation_error(e: ValidationError, source: str) -> str:
    fields = list(LLMTrainingParams.model_fields) + ["cutoff_len"]
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = (f" (did you mean '{OTHER_NAMES[loc]}'?)" if loc in OTHER_NAMES else _suggest(loc, fields)
                    or "; `aitraining llm --help` lists the parameters")
            lines.append(f"unknown parameter '{loc}'{hint}")
        elif not loc:
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            flag = "--" + loc.replace("_", "-")
            field = LLMTrainingParams.model_fields.get(loc)
            default = f" (default: {field.default})" if field is not None and field.default is not None else ""
            lines.append(f"{loc} ({flag}) = {err.get('input')!r}: {err['msg']}{default}")
    return f"{source}: " + "; ".join(lines)


# Names other trainers use (transformers TrainingArguments, LLaMA-Factory) -> ours, for hints.
OTHER_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "gradient_accumulation", "lr_scheduler_type": "scheduler",
               "model_name_or_path": "model", "dataset": "data_path", "output_dir": "project_name",
               "cutoff": "block_size", "max_seq_length": "block_size", "template": "chat_template",
               "lora_rank": "lora_r", "lora_target": "target_modules", "stage": "trainer"}


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def dumps(p: LLMTrainingParams) -> str:
    return yaml.safe_dump(to_dict(p), sort_keys=False, allow_unicode=True, default_flow_style=False)


def loads(text: str, source: str = "config") -> LLMTrainingParams:
    try:
        doc = yaml.safe_load(text)  # never yaml.load: a tag like !!python/object could run code
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{source}: refused: it uses a YAML tag that builds a Python object "
                          f"({e.problem.split('tag ')[-1] if e.problem else 'unknown tag'}, "
                          f"line {e.problem_mark.line + 1 if e.problem_mark else '?'}); run files hold "
                          "plain values only: remove the tag") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    return from_dict(doc, source)


def load(path: str | os.PathLike) -> LLMTrainingParams:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file. Fix: check the path (a run directory's config.yaml "
                          "replays that run)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the YAML as UTF-8") from None
    return loads(text, str(path))


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write text to path so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(p: LLMTrainingParams, path: str | os.PathLike) -> Path:
    atomic_write(path, dumps(p))
    return Path(path)
