"""dataset_info.json: the registry of named datasets, LLaMA-Factory compatible.

    {"identity": {"file_name": "identity.json"},
     "my_chat":  {"file_name": "chat.jsonl", "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "system": "system"}},
     "my_pairs": {"file_name": "pairs.jsonl", "ranking": true,
                  "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}}

Only local files are supported (no hub URLs): file_name is relative to the data directory
and may not leave it. Every problem is a DataError naming dataset_info.json and the entry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import DATA_DIR
from core.errors import DataError

INFO_FILE = "dataset_info.json"


class Columns(BaseModel):
    """Which column of the file holds each part; unset ones take the formatting's default."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    query: str | None = None
    response: str | None = None
    history: str | None = None
    messages: str | None = None
    system: str | None = None
    tools: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None
    text: str | None = None


class Tags(BaseModel):
    """ShareGPT message keys and role names (defaults: from/value, human/gpt/system)."""

    model_config = ConfigDict(extra="forbid")
    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    observation_tag: str | None = None
    function_tag: str | None = None
    system_tag: str | None = None


class DatasetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_name: str = Field(min_length=1)
    formatting: Literal["alpaca", "sharegpt", "openai"] = "alpaca"
    ranking: bool = False
    columns: Columns = Field(default_factory=Columns)
    tags: Tags = Field(default_factory=Tags)
    split: str = "train"
    num_samples: int | None = Field(default=None, ge=1)

    def spec(self) -> dict:
        """Keyword arguments for formats.convert_row."""
        return {"formatting": self.formatting,
                "columns": self.columns.model_dump(exclude_none=True),
                "tags": self.tags.model_dump(exclude_none=True)}


def dataset_kind(entry: DatasetEntry) -> str:
    """sft, text (pretraining), preference (ranking: true) or kto (a kto_tag column).

    Text data is an alpaca entry with a `text` column, or with only a `prompt` column
    (LLaMA-Factory's pretraining style: "columns": {"prompt": "text"}).
    """
    if entry.ranking:
        return "preference"
    if entry.columns.kto_tag:
        return "kto"
    given = entry.columns.model_dump(exclude_none=True)
    if entry.formatting == "alpaca" and ("text" in given or set(given) == {"prompt"}):
        return "text"
    return "sft"


def _info_error(path, message, entry=None, field=None, expected=None, fix=None):
    where = entry if field is None else f"{entry}.{field}"
    return DataError(str(path), message if entry is None else f"dataset '{entry}': {message}",
                     field=where, expected=expected, fix=fix)


def entry_path(data_dir, name: str, entry: DatasetEntry, *, must_exist=True) -> Path:
    """The entry's file (or folder) inside data_dir; refuses paths that leave it."""
    data_dir = Path(data_dir)
    info = data_dir / INFO_FILE
    rel = Path(entry.file_name)
    if rel.is_absolute() or ".." in rel.parts:
        raise _info_error(info, f"file_name {entry.file_name!r} leaves the data directory", name,
                          "file_name", expected=f"a path relative to {data_dir}",
                          fix=f"copy the file into {data_dir} and give its relative name")
    path = data_dir / rel
    try:  # a symlink may still point outside
        path.resolve().relative_to(data_dir.resolve())
    except ValueError:
        raise _info_error(info, f"file_name {entry.file_name!r} resolves outside the data directory",
                          name, "file_name") from None
    if must_exist and not path.exists():
        raise _info_error(info, f"file {path} does not exist", name, "file_name",
                          fix=f"put the file in {data_dir} or correct file_name")
    return path


def _validate(path, name, raw) -> DatasetEntry:
    if not isinstance(name, str) or not name.strip() or "," in name:
        raise _info_error(path, "dataset names must be non-empty and contain no comma", name)
    try:
        return DatasetEntry.model_validate(raw)
    except ValidationError as e:
        # an unknown key explains a missing one (hf_hub_url instead of file_name): report it first
        err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        loc = ".".join(str(x) for x in err["loc"])
        fix = None
        if err["type"] == "extra_forbidden":
            fix = ("allowed keys: " + ", ".join(DatasetEntry.model_fields) +
                   "; only local files are supported (no hub URLs)")
            if len(err["loc"]) == 2:
                model = Columns if err["loc"][0] == "columns" else Tags
                fix = "allowed keys: " + ", ".join(model.model_fields)
        if err["type"] == "missing":
            fix = f'add "{loc}" to the entry, e.g. "file_name": "my_data.jsonl" (a file in the data directory)'
        elif err["type"] == "literal_error":
            fix = f"use one of the allowed values for {loc}"
        raise _info_error(path, err["msg"], name, loc or None, fix=fix) from None


def load_dataset_info(data_dir=DATA_DIR, *, check_files: bool = True) -> dict[str, DatasetEntry]:
    """Read and validate data_dir/dataset_info.json; {} when there is none."""
    path = Path(data_dir) / INFO_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"not valid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                        fix="check commas, quotes and brackets around that spot") from None
    if not isinstance(raw, dict):
        raise DataError(str(path), f"top level is a {type(raw).__name__}",
                        expected='an object {"name": {"file_name": ...}, ...}')
    entries = {name: _validate(path, name, value) for name, value in raw.items()}
    for name, entry in entries.items():
        entry_path(data_dir, name, entry, must_exist=check_files)
    return entries


def save_dataset_info(data_dir, entries: dict) -> Path:
    """Validate and write the registry atomically (temp file + os.replace)."""
    data_dir = Path(data_dir)
    path = data_dir / INFO_FILE
    out = {}
    for name, entry in entries.items():
        entry = entry if isinstance(entry, DatasetEntry) else _validate(path, name, entry)
        entry_path(data_dir, name, entry, must_exist=False)
        out[name] = entry.model_dump(exclude_defaults=True, exclude_none=True)
    from core.config_io import atomic_write

    atomic_write(path, json.dumps(out, ensure_ascii=False, indent=2) + "\n")
    return path
