"""--data-path -> canonical train (and eval) records.

data_path is one or several comma-separated parts, each of which is
  - a file: .jsonl, .json (array of objects), .csv or .parquet;
  - a directory holding `{split}.jsonl|.json|.csv|.parquet` (or `{split}-*.<ext>` shards);
  - the name of an entry in data_dir/dataset_info.json.
Files are read with plain Python, pandas (csv) and pyarrow (parquet) so that every error can
name the file and the 1-based record: the line for JSONL, index+1 for JSON arrays, data row+1
for CSV and parquet.
"""
from __future__ import annotations

import codecs
import io
import json
import random
import re
from pathlib import Path

from core import DATA_DIR
from core.data import formats
from core.data.registry import INFO_FILE, dataset_kind, entry_path, load_dataset_info
from core.errors import ConfigError, DataError

EXTS = (".jsonl", ".json", ".csv", ".parquet")
KINDS = formats.KINDS
# One record larger than this is a mistake (a whole file pasted into one field, a missing
# newline), not a training example: 16 MiB is ~4M tokens, far past any context window.
MAX_RECORD_BYTES = 16 * 1024 * 1024
# Files that are not text, by their first bytes: named in the error instead of "not UTF-8".
MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
         (b"RIFF", "a RIFF (WebP/WAV) file"), (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"),
         (b"\x1f\x8b", "a gzip archive"), (b"PAR1", "a parquet file"), (b"BM", "a bitmap image"))
# Trainer (or LLaMA-Factory stage) -> the kind of records it consumes.
KIND_BY_TRAINER = {
    "pt": "text", "sft": "sft", "default": "sft", "generic": "sft", "distillation": "sft",
    "ppo": "sft", "dpo": "preference", "orpo": "preference", "simpo": "preference",
    "reward": "preference", "rm": "preference", "kto": "kto",
}
MAPPING_FLAGS = ("text_column", "prompt_text_column", "rejected_text_column")


def kind_for_trainer(trainer: str) -> str:
    return KIND_BY_TRAINER.get(trainer, trainer)


# --------------------------------------------------------------------------- reading files

def _decode(path: Path) -> str:
    data = path.read_bytes()
    for magic, what in MAGIC:
        if data.startswith(magic) and (magic != b"BM" or b"\0" in data[:64]):
            hint = ("rename it to .parquet" if magic == b"PAR1" else
                    "training data here is text: give a .jsonl/.json/.csv/.parquet file of text records "
                    "(images are not supported)")
            raise DataError(str(path), f"this is {what}, not {path.suffix or 'text'} text", fix=hint)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(str(path), f"not valid UTF-8: byte 0x{data[e.start]:02x} on line {line}",
                        record=line if path.suffix == ".jsonl" else None,
                        fix="save the file as UTF-8") from None
    if not text.strip():
        raise DataError(str(path), "the file is empty", fix="add records or point at another file")
    return text


def _record(path, n, value):
    if not isinstance(value, dict):
        raise DataError(str(path), f"record is a JSON {type(value).__name__}", record=n,
                        expected="a JSON object {...}")
    return n, value


def _jsonl(path: Path, text: str):
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in strings
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_BYTES:
            raise DataError(str(path), f"the record is {len(line) / 2**20:.0f} MiB long, over the "
                            f"{MAX_RECORD_BYTES // 2**20} MiB limit for one record", record=n,
                            fix="split the text into several records (one per line), or check for a "
                                "missing line break that merged many records into one")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(path), f"invalid JSON at column {e.colno}: {e.msg}", record=n,
                            expected="one JSON object per line") from None
        rows.append(_record(path, n, value))
    return rows


def _json(path: Path, text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Extra data") and text.lstrip().startswith("{"):
            return _jsonl(path, text)  # JSON Lines saved as .json
        raise DataError(str(path), f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                        expected="an array of records [{...}, ...]") from None
    if not isinstance(value, list):
        raise DataError(str(path), f"top level is a JSON {type(value).__name__}",
                        expected="an array of records [{...}, ...]",
                        fix="wrap the records in [ ] or save them as JSON Lines (.jsonl)")
    return [_record(path, i + 1, v) for i, v in enumerate(value)]


def _maybe_json(cell):
    """CSV cells holding JSON lists/objects (messages, history) are decoded."""
    if isinstance(cell, str) and cell[:1] in "[{":
        try:
            value = json.loads(cell)
        except ValueError:
            return cell
        return value if isinstance(value, (list, dict)) else cell
    return cell


def _csv(path: Path, text: str):
    import pandas as pd

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(str(path), "the file is empty") from None
    except pd.errors.ParserError as e:
        raise DataError(str(path), f"malformed CSV: {e}", expected="the same number of fields "
                        "on every line; quote fields holding commas") from None
    if df.empty:
        raise DataError(str(path), "the file has a header but no rows", fix="add one row per record under the header")
    for i, row in enumerate(df.itertuples(index=False), 1):
        if sum(len(v) for v in row) > MAX_RECORD_BYTES:
            raise DataError(str(path), f"the record is over the {MAX_RECORD_BYTES // 2**20} MiB limit for "
                            "one record", record=i, fix="split the text into several rows, or check for "
                            "an unclosed quote that merged many rows into one")
    return [(i + 1, {k: _maybe_json(v) for k, v in row.items()})
            for i, row in enumerate(df.to_dict("records"))]


def _parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(str(path), f"cannot read parquet: {e}",
                        fix="export the file again (pandas: df.to_parquet(path)), or save it as .jsonl") from None
    if not rows:
        raise DataError(str(path), "the file has no rows")
    return list(enumerate(rows, 1))


def read_rows(path) -> list[tuple[int, dict]]:
    """A data file -> [(record_number, row), ...]."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EXTS:
        raise DataError(str(path), f"unsupported file type '{ext}'", expected=", ".join(EXTS))
    if not path.is_file():
        raise DataError(str(path), "file not found")
    if ext == ".parquet":
        return _parquet(path)
    text = _decode(path)
    if ext == ".jsonl":
        rows = _jsonl(path, text)
        if not rows:
            raise DataError(str(path), "the file holds no records")
        return rows
    if ext == ".json":
        rows = _json(path, text)
        if not rows:
            raise DataError(str(path), "the array is empty", expected="at least one record")
        return rows
    return _csv(path, text)


# --------------------------------------------------------------------------- resolving parts

def _split_files(folder: Path, split: str) -> list[Path]:
    found = [folder / f"{split}{ext}" for ext in EXTS if (folder / f"{split}{ext}").is_file()]
    if not found:
        found = sorted(p for p in folder.glob(f"{split}-*") if p.suffix in EXTS)
        found = [p for p in found if p.suffix == found[0].suffix] if found else []
    if len(found) > 1 and not found[0].stem.startswith(f"{split}-"):
        raise DataError(str(folder), f"several '{split}' files: {[p.name for p in found]}",
                        fix="keep one of them")
    if not found:
        listing = sorted(p.name for p in folder.iterdir()
                         if p.suffix in EXTS and p.name != INFO_FILE)[:20]
        fix = f"name the file {split}.jsonl, or set --train-split / --valid-split"
        if (folder / INFO_FILE).is_file():
            fix += f"; to use a dataset registered in {folder / INFO_FILE}, pass its name"
        raise DataError(str(folder), f"no '{split}' file in this directory (data files here: {listing})",
                        expected=f"{split}.jsonl, {split}.json, {split}.csv or {split}.parquet", fix=fix)
    return found


def _entry_files(data_dir, name, entry) -> list[Path]:
    path = entry_path(data_dir, name, entry)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in EXTS)
        if not files:
            raise DataError(str(path), f"dataset '{name}': no data files in this folder",
                            expected=", ".join(EXTS))
        return files
    return [path]


class _Source:
    def __init__(self, name, files, entry=None, folder=None):
        self.name, self.files, self.entry, self.folder = name, files, entry, folder


def _resolve(data_path: str, split: str, data_dir: Path, registry: dict) -> list[_Source]:
    whole = Path(str(data_path)).expanduser()
    parts = [str(data_path)] if whole.exists() else [p.strip() for p in str(data_path).split(",")]
    sources = []
    for part in filter(None, parts):
        path = Path(part).expanduser()
        if path.is_file():
            sources.append(_Source(part, [path]))
        elif path.is_dir():
            sources.append(_Source(part, _split_files(path, split), folder=path))
        elif part in registry():
            entry = registry()[part]
            sources.append(_Source(part, _entry_files(data_dir, part, entry), entry=entry))
        elif (Path(data_dir) / part).is_file() and ".." not in Path(part).parts:
            sources.append(_Source(part, [Path(data_dir) / part]))
        else:
            names = sorted(registry())
            raise DataError(part, "no such file or directory, and no dataset of that name in "
                            f"{Path(data_dir) / INFO_FILE}",
                            expected="a .jsonl/.json/.csv/.parquet file, a directory holding "
                                     f"{split}.jsonl, or one of the registered names: "
                                     + (", ".join(names) or "(none)"),
                            fix="check the path, or register the file in dataset_info.json")
    if not sources:
        raise DataError(str(data_path), "no dataset given", fix="set --data-path")
    return sources


# --------------------------------------------------------------------------- converting

def _file_spec(row, n, file, kind, flags, mapping, auto_convert) -> dict:
    """How to read a file that has no dataset_info.json entry, from its first row."""
    if mapping:  # LLaMA-Factory column names given directly
        formatting = "sharegpt" if "messages" in mapping else "alpaca"
        return {"formatting": formatting, "columns": mapping}
    text, prompt, rejected = (flags["text_column"], flags["prompt_text_column"],
                              flags["rejected_text_column"])
    explicit = text != "text" or prompt or rejected
    # Without column flags, a file whose rows lack the default `text` column is read by its
    # recognisable shape (alpaca, sharegpt, messages, preference, kto) as --auto-convert-dataset
    # would: a clear format should not need a flag. --auto-convert-dataset forces detection.
    if not explicit and (auto_convert or (kind != "text" and text not in row)):
        return formats.spec_for_detected(formats.detect_format(row, file, n), row)
    extra = {k: k for k in ("system", "tools") if k in row}
    if kind == "text":
        return {"formatting": "alpaca", "columns": {"text": text}}
    if kind == "sft":
        if text == "text" and text not in row and "messages" in row:  # OpenAI messages as is
            return {"formatting": "openai", "columns": {**extra, "messages": "messages"}}
        return {"formatting": "alpaca", "columns": {**extra, "text": text}}
    if kind == "preference":
        return {"formatting": "alpaca", "columns": {
            **extra, "prompt": prompt or "prompt", "rejected": rejected or "rejected",
            "chosen": text if text in row else "chosen"}}
    return {"formatting": "alpaca", "columns": {
        **extra, "prompt": prompt or "prompt", "response": text if text in row else "completion",
        "kto_tag": "label" if "label" in row else "kto_tag"}}


def _sample(rows, num, seed):
    """LLaMA-Factory's num_samples: a seeded subset, or repeats when asking for more."""
    rng = random.Random(seed)
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    while len(idx) < num:
        idx.append(rng.randrange(len(rows)))
    return [rows[i] for i in sorted(idx[:num])]


def _difficulty(row: dict, column: str, file, n) -> float:
    value = row.get(column) if isinstance(row, dict) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(str(file), f"--curriculum {column}: the value {value!r} is not a number",
                        record=n, field=column, fix=f"give every record a numeric '{column}', or use "
                        "--curriculum length") from None


def _load_source(src: _Source, kind, flags, mapping, auto_convert, max_samples, seed, data_dir):
    spec, convert_kind = None, kind
    if src.entry is not None:
        have = dataset_kind(src.entry)
        if have != kind and not (kind == "sft" and have == "text"):
            raise DataError(str(Path(data_dir) / INFO_FILE),
                            f"dataset '{src.name}' holds {have} data, but this trainer needs {kind} data",
                            field=src.name, fix="pick a dataset of the right kind, or change --trainer")
        spec, convert_kind = src.entry.spec(), have
    records = []
    for file in src.files:
        rows = read_rows(file)
        if src.entry is not None and src.entry.num_samples:
            rows = _sample(rows, src.entry.num_samples, seed)
        if max_samples:
            rows = rows[:max(0, max_samples - len(records))]
        file_spec = spec or _file_spec(rows[0][1], rows[0][0], file, kind, flags, mapping, auto_convert)
        try:
            converted = formats.convert_rows(rows, kind=convert_kind, file=str(file), **file_spec)
        except DataError as e:
            raise _mixed_formats(e, rows, file) from None
        if flags.get("difficulty_column"):  # --curriculum <column>: carry the row's difficulty along
            for (n, row), rec in zip(rows, converted):
                rec["difficulty"] = _difficulty(row, flags["difficulty_column"], file, n)
        records += converted
        if max_samples and len(records) >= max_samples:
            break
    return records


def _mixed_formats(error: DataError, rows, file) -> DataError:
    """A record that fails because it is in another format than the file's first record says so."""
    bad = next((row for n, row in rows if n == error.record), None)
    if bad is None or error.record == rows[0][0]:
        return error
    try:
        first, this = formats.detect_format(rows[0][1]), formats.detect_format(bad)
    except DataError:
        return error
    if first == this:
        return error
    return DataError(str(file), f"this record is in {this} format, but the file's first record "
                     f"(record {rows[0][0]}) is in {first} format: one file must hold one format "
                     f"({error})", record=error.record,
                     fix=f"convert the {this} records to {first} (or the other way), or split them "
                         "into separate files")


_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def fill_placeholders(value, placeholders: dict):
    """Replace {{name}}-style placeholders in every string of a record."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: str(placeholders.get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [fill_placeholders(v, placeholders) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, placeholders) for k, v in value.items()}
    return value


def split_eval(records: list, val_size, seed: int = 42):
    """Seeded split: val_size is a fraction in (0, 1) or a whole count of eval records."""
    if not val_size:
        return records, None
    n = len(records)
    if 0 < val_size < 1:
        k = max(1, round(n * val_size))
    elif val_size >= 1 and float(val_size).is_integer():
        k = int(val_size)
    else:
        raise ConfigError(f"val_size {val_size!r} must be a fraction in (0, 1) or a whole count >= 1")
    if k >= n:
        raise ConfigError(f"val_size {val_size!r} takes {k} of {n} records and leaves none to "
                          "train on; lower val_size or add data")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    held = set(idx[:k])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def load_data(data_path, *, kind="sft", split="train", valid_split=None, val_size=0.0,
              max_samples=None, text_column="text", prompt_text_column=None,
              rejected_text_column=None, column_mapping=None, auto_convert=False,
              data_dir=DATA_DIR, seed=42, placeholders=None,
              difficulty_column=None) -> tuple[list[dict], list[dict] | None]:
    """Load, validate and convert data -> (train records, eval records or None).

    kind: sft | text | preference | kto (a trainer name such as dpo is mapped to its kind).
    valid_split: for directories, the file stem next to the train file (e.g. "validation");
    otherwise a file path or registered dataset name(s). val_size splits eval off train
    when there is no valid_split. max_samples caps each dataset (train and eval).
    """
    kind = kind_for_trainer(kind)
    if kind not in KINDS:
        raise ConfigError(f"unknown data kind {kind!r}; expected one of {KINDS} or a trainer name")
    if valid_split and val_size:
        raise ConfigError("give either --valid-split or val_size, not both")
    flags = {"text_column": text_column or "text", "prompt_text_column": prompt_text_column,
             "rejected_text_column": rejected_text_column, "difficulty_column": difficulty_column}
    mapping = {}
    for key, value in (column_mapping or {}).items():
        if key in MAPPING_FLAGS:
            flags[key] = value
        elif key in formats.COLUMN_KEYS:
            mapping[key] = value
        else:
            raise ConfigError(f"column_mapping key {key!r} is unknown; use "
                              f"{', '.join(MAPPING_FLAGS + formats.COLUMN_KEYS)}")

    cache = {}

    def registry():
        if "info" not in cache:
            cache["info"] = load_dataset_info(data_dir, check_files=False)
        return cache["info"]

    def load(sources):
        out = []
        for src in sources:
            out += _load_source(src, kind, flags, mapping, auto_convert, max_samples, seed, data_dir)
        return out

    sources = _resolve(data_path, split, data_dir, registry)
    train = load(sources)
    if valid_split:
        folders = [s.folder for s in sources]
        if all(folders) and not Path(valid_split).is_file():  # directories: a sibling split file
            eval_sources = [_Source(str(f), _split_files(f, valid_split), folder=f) for f in folders]
        else:  # a file path or registered name(s)
            eval_sources = _resolve(valid_split, valid_split, data_dir, registry)
        evals = load(eval_sources)
    else:
        train, evals = split_eval(train, val_size, seed)
    if placeholders:
        train = fill_placeholders(train, placeholders)
        evals = fill_placeholders(evals, placeholders) if evals is not None else None
    return train, evals


def load_for_params(params, kind: str):
    """load_data with a run's parameters (LLMTrainingParams): (train records, eval records or None)."""
    return load_data(
        params.data_path, kind=kind, split=params.train_split, valid_split=params.valid_split,
        val_size=params.val_size, max_samples=params.max_samples, text_column=params.text_column,
        prompt_text_column=params.prompt_text_column, rejected_text_column=params.rejected_text_column,
        column_mapping=params.column_mapping, auto_convert=params.auto_convert_dataset,
        data_dir=Path(params.dataset_dir) if params.dataset_dir else DATA_DIR, seed=params.seed,
        placeholders={"name": params.identity_name, "author": params.identity_author},
        difficulty_column=params.curriculum if params.curriculum not in (None, "length") else None,
    )
