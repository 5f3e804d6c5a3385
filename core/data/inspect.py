"""The dataset tab's logic: check every record, preview pages with the trained tokens marked,
copy uploaded files into the data directory and register them.

Plain data in, plain data out (dicts, lists, strings); the web UI renders it and nothing here
imports Gradio. Reading and converting go through the loader's own functions (read_rows,
its per-file format detection, formats.convert_row), so what passes here loads in training.

    errors = validate_file("chat.jsonl")              # [] when every record is fine
    errors = validate_entry(data_dir, "identity")
    page = preview("identity", data_dir=data_dir, tokenizer=tok, chat_template="chatml")
    path = upload_file(data_dir, "/tmp/gradio/x/chat.jsonl")
    add_entry(data_dir, "my_chat", file_name=path.name, formatting="openai")
"""
from __future__ import annotations

import filecmp
import html
import math
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import ValidationError

from core import DATA_DIR
from core.data import formats
from core.data.loader import (
    EXTS, _entry_files, _file_spec, _mixed_formats, _resolve, fill_placeholders, kind_for_trainer, read_rows,
)
from core.data.registry import (
    INFO_FILE, DatasetEntry, dataset_kind, entry_path, load_dataset_info, save_dataset_info,
)
from core.errors import DataError

MAX_UPLOAD_BYTES = 50 * 2**20
# The loader's defaults for files without a dataset_info.json entry (no column flags given).
_FLAGS = {"text_column": "text", "prompt_text_column": None, "rejected_text_column": None}


def error_dict(e: DataError) -> dict:
    """A DataError as plain data; record is None for file-level problems."""
    return {"record": e.record, "field": e.field, "message": str(e), "file": e.file,
            "expected": e.expected, "fix": e.fix}


# --------------------------------------------------------------------------- shared helpers

def _spec(rows, file, kind, formatting, columns, tags, flags=None) -> dict:
    """How to convert the rows of one file: the given formatting, else the loader's rules.

    The loader decides from the first row; when that row is too broken to tell the format,
    the first row that can tell decides here, so the broken row is reported like any other.
    """
    if formatting:
        return {"formatting": formatting, "columns": dict(columns or {}), "tags": dict(tags or {})}
    first = None
    for n, row in rows:
        try:
            spec = _file_spec(row, n, str(file), kind, flags or _FLAGS, dict(columns or {}), False)
        except DataError as e:
            first = first or e
            continue
        return {**spec, "tags": dict(tags or {})} if tags else spec
    raise DataError(str(file), "cannot tell the format of any record (the first one has columns "
                    f"{sorted(rows[0][1])})", expected=first.expected, fix=first.fix)


def _convert(file, n, row, kind, spec) -> tuple[dict | None, DataError | None]:
    """One row -> (canonical record, None) or (None, the DataError naming it)."""
    try:
        return formats.convert_row(row, kind=kind, file=str(file), record=n, **spec), None
    except DataError as e:
        return None, e


def _entry_kind(data_dir, name, entry, kind) -> str:
    """The entry's own kind, refused (as the loader does) when the trainer needs another."""
    have = dataset_kind(entry)
    if kind is not None and have != kind and not (kind == "sft" and have == "text"):
        raise DataError(str(Path(data_dir) / INFO_FILE),
                        f"dataset '{name}' holds {have} data, but this trainer needs {kind} data",
                        field=name, fix="pick a dataset of the right kind, or change --trainer")
    return have


def _check_rows(file, kind, spec_args, max_errors) -> list[dict]:
    rows = read_rows(file)
    spec = _spec(rows, file, kind, *spec_args)
    errors = []
    for n, row in rows:
        _, err = _convert(file, n, row, kind, spec)
        if err is not None:
            errors.append(error_dict(err))
            if len(errors) >= max_errors:
                break
    return errors


# --------------------------------------------------------------------------- validation

def validate_file(path, *, kind="sft", formatting=None, columns=None, tags=None,
                  max_errors=50) -> list[dict]:
    """Check every record of one file; [] when all are fine.

    kind: sft | text | preference | kto (or a trainer name). formatting None reads the file
    as training would without an entry (its shape is detected; columns act as column_mapping).
    Each error: {record, field, message, file, expected, fix}; file-level problems (not UTF-8,
    bad JSON, empty, unknown format) are one error with record None. At most max_errors.
    """
    kind = kind_for_trainer(kind)
    try:
        return _check_rows(Path(path), kind, (formatting, columns, tags), max_errors)
    except DataError as e:
        return [error_dict(e)]


def validate_entry(data_dir, name) -> list[dict]:
    """Check every record of a dataset_info.json entry (every file of a folder entry)."""
    data_dir = Path(data_dir)
    errors: list[dict] = []
    try:
        entries = load_dataset_info(data_dir, check_files=False)
        if name not in entries:
            raise DataError(str(data_dir / INFO_FILE), f"no dataset named {name!r}", field=name,
                            expected="one of: " + (", ".join(sorted(entries)) or "(none)"))
        entry = entries[name]
        kind = dataset_kind(entry)
        files = _entry_files(data_dir, name, entry)
    except DataError as e:
        return [error_dict(e)]
    spec = entry.spec()
    args = (spec["formatting"], spec["columns"], spec["tags"])
    for file in files:
        try:
            errors += _check_rows(file, kind, args, 50 - len(errors))
        except DataError as e:
            errors.append(error_dict(e))
        if len(errors) >= 50:
            break
    return errors


# --------------------------------------------------------------------------- preview

def _segments(tokenizer, input_ids, labels) -> list[tuple[str, bool]]:
    """Contiguous runs of trained / untrained tokens, decoded: [(text, trained), ...].

    Each run's text is the growth of the decoded prefix, so spaces a tokenizer attaches at a
    run boundary are kept; a run is decoded alone only if prefixes don't decode stably.
    """
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out, start, done = [], 0, ""
    for i in range(1, len(input_ids) + 1):
        trained = labels[start] != -100
        if i < len(input_ids) and (labels[i] != -100) == trained:
            continue
        text = decode(input_ids[:i])
        piece = text[len(done):] if text.startswith(done) else decode(input_ids[start:i])
        out.append((piece, trained))
        start, done = i, text
    return out


def render_segments_html(segments) -> str:
    """Escaped HTML of a record with its trained spans in <mark class="trained">."""
    parts = [f'<mark class="trained">{html.escape(t)}</mark>' if trained else html.escape(t)
             for t, trained in segments]
    return '<div class="token-preview" style="white-space: pre-wrap">' + "".join(parts) + "</div>"


def _view(tokenizer, ex) -> dict:
    if ex is None:
        return {"num_tokens": 0, "num_trained": 0, "segments": [], "html": "",
                "note": "no trainable tokens (empty answer, or cutoff_len too short): "
                        "training skips this record"}
    ids, labels = ex["input_ids"], ex["labels"]
    segments = _segments(tokenizer, ids, labels)
    return {"num_tokens": len(ids), "num_trained": sum(label != -100 for label in labels),
            "segments": segments, "html": render_segments_html(segments)}


def _tokenize(record, tokenizer, template, opts) -> dict:
    """Token counts and trained segments, encoded exactly as training encodes the record."""
    from core.data.tokenize import encode_sft_record, encode_text_record

    def conv(messages):
        return _view(tokenizer, encode_sft_record(tokenizer, {"messages": messages, "tools": None},
                                                  template, **opts))

    if record.get("messages"):
        return _view(tokenizer, encode_sft_record(tokenizer, record, template, **opts))
    if "text" in record:
        return _view(tokenizer, encode_text_record(tokenizer, record["text"],
                                                   cutoff_len=opts["cutoff_len"]))
    if "chosen" in record:  # preference: the chosen conversation, the rejected one beside it
        return {**conv(record["prompt"] + record["chosen"]),
                "rejected": conv(record["prompt"] + record["rejected"])}
    return conv(record["prompt"] + record["completion"])  # kto


def preview(data_path_or_name, *, data_dir=DATA_DIR, kind="sft", page=0, page_size=5,
            tokenizer=None, chat_template=None, cutoff_len=1024, train_on_prompt=False,
            mask_history=False, placeholders=None, model_type=None, text_column="text",
            prompt_text_column=None, rejected_text_column=None, column_mapping=None) -> dict:
    """One page of a dataset (a file, folder or registered name) as training will see it.

    Returns {"total", "page", "pages", "page_size", "kind", "records": [...]} where each record
    is {"index" (0-based over the dataset), "file", "record" (number in its file), "raw",
    "data" (canonical record, None if invalid), "error" (error dict or None)}; with a tokenizer,
    valid records add num_tokens, num_trained, segments [(text, trained)], html (and for
    preference data the same under "rejected"). chat_template is resolved like
    --chat-template (None = auto: the tokenizer's own, else model_type's default, else
    chatml). kind None takes a registered dataset's own kind.
    File-level problems raise DataError; bad records show inline. The column flags and
    column_mapping read files the way training does (--text-column, ...).
    """
    data_dir = Path(data_dir)
    flags = {"text_column": text_column or "text", "prompt_text_column": prompt_text_column,
             "rejected_text_column": rejected_text_column}
    mapping = {}
    for key, value in (column_mapping or {}).items():
        (flags if key in flags else mapping)[key] = value
    kind = kind_for_trainer(kind) if kind else None
    cache = {}

    def registry():
        if "info" not in cache:
            cache["info"] = load_dataset_info(data_dir, check_files=False)
        return cache["info"]

    rows = []  # (file, number, row, kind, spec) for every record
    for src in _resolve(str(data_path_or_name), "train", data_dir, registry):
        if src.entry is not None:
            k = _entry_kind(data_dir, src.name, src.entry, kind)
            spec = src.entry.spec()
        else:
            k, spec = kind or "sft", None
        for file in src.files:
            file_rows = read_rows(file)
            file_spec = spec or _spec(file_rows, file, k, None, mapping, None, flags)
            rows += [(file, n, row, k, file_spec) for n, row in file_rows]

    page_size = max(1, int(page_size))
    pages = max(1, math.ceil(len(rows) / page_size))
    page = min(max(0, int(page)), pages - 1)
    template = None
    if tokenizer is not None:
        from core.templates import resolve_chat_template

        template = resolve_chat_template(chat_template, tokenizer, model_type)
    opts = dict(cutoff_len=cutoff_len, train_on_prompt=train_on_prompt, mask_history=mask_history)
    out = []
    for index in range(page * page_size, min(len(rows), (page + 1) * page_size)):
        file, n, row, k, spec = rows[index]
        data, err = _convert(file, n, row, k, spec)
        if err is not None:  # a record in another format than its file's first: say so
            first = next(r for r in rows if r[0] == file)
            err = _mixed_formats(err, [(first[1], first[2]), (n, row)], file)
        if data is not None and placeholders:
            data = fill_placeholders(data, placeholders)
        item = {"index": index, "file": str(file), "record": n, "raw": row, "data": data,
                "error": error_dict(err) if err else None}
        if data is not None and tokenizer is not None:
            item.update(_tokenize(data, tokenizer, template, opts))
        out.append(item)
    return {"total": len(rows), "page": page, "pages": pages, "page_size": page_size,
            "kind": rows[0][3] if rows else kind, "records": out}


# --------------------------------------------------------------------------- upload + register

def _check_name(name: str, data_dir: Path) -> None:
    bad = (not name or name in (".", "..") or name.startswith(".") or
           any(c in name for c in "/\\\0") or name == INFO_FILE)
    if bad:
        raise DataError(name or "<empty name>", "not a plain file name for the data directory",
                        expected="a name like chat.jsonl, without folders, '..' or a leading dot, "
                                 f"and not {INFO_FILE}",
                        fix=f"rename the file; it is stored in {data_dir}")
    if Path(name).suffix.lower() not in EXTS:
        raise DataError(name, f"unsupported file type '{Path(name).suffix}'",
                        expected=", ".join(EXTS))


def upload_file(data_dir, src_path, name=None, max_bytes=MAX_UPLOAD_BYTES, *,
                overwrite=False) -> Path:
    """Copy an uploaded file into data_dir (never elsewhere) and return its new path.

    name defaults to the source's file name. Refused with a DataError: names with folders,
    '..' or a leading dot, dataset_info.json itself, unknown extensions, files over max_bytes,
    and an existing different file of that name unless overwrite. The same file again is fine.
    Register it afterwards with add_entry.
    """
    data_dir, src = Path(data_dir), Path(src_path)
    name = Path(src).name if name is None else str(name)
    _check_name(name, data_dir)
    if not src.is_file():
        raise DataError(str(src), "uploaded file not found")
    size = src.stat().st_size
    if size > max_bytes:
        raise DataError(name, f"the file is {size / 2**20:.1f} MiB, over the "
                              f"{max_bytes / 2**20:.1f} MiB upload limit",
                        fix=f"split it, or copy it into {data_dir} by hand and register it")
    data_dir.mkdir(parents=True, exist_ok=True)
    dest = data_dir / name
    if dest.resolve().parent != data_dir.resolve():  # e.g. a symlink pointing out
        raise DataError(name, f"{dest} resolves outside {data_dir}", fix="choose another name")
    if dest.exists():
        if dest.is_file() and filecmp.cmp(src, dest, shallow=False):
            return dest
        if not overwrite:
            raise DataError(str(dest), "a different file of this name already exists",
                            fix="choose another name, or overwrite it")
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".upload.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def add_entry(data_dir, name, *, file_name, formatting="alpaca", columns=None, tags=None,
              ranking=False, overwrite=False) -> None:
    """Register file_name (inside data_dir) as dataset `name` in dataset_info.json.

    Refuses a taken name unless overwrite, a file that is missing or leaves data_dir, and
    anything dataset_info.json would refuse (unknown keys, a comma in the name).
    """
    data_dir = Path(data_dir)
    entries = load_dataset_info(data_dir, check_files=False)
    if name in entries and not overwrite:
        raise DataError(str(data_dir / INFO_FILE), f"a dataset named {name!r} already exists",
                        field=name, fix="choose another name, or overwrite it")
    raw = {"file_name": file_name, "formatting": formatting, "ranking": ranking,
           "columns": {k: v for k, v in (columns or {}).items() if v},
           "tags": {k: v for k, v in (tags or {}).items() if v}}
    try:
        entry = DatasetEntry.model_validate(raw)
    except ValidationError:
        entry = None  # save_dataset_info below names the bad key, before writing anything
    if entry is not None:
        entry_path(data_dir, name, entry)  # inside data_dir, and there
    save_dataset_info(data_dir, {**entries, name: entry or raw})
