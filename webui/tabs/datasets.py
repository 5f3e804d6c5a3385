"""Datasets tab: the dataset_info.json registry (list, add, edit, delete), uploads into the data
directory, and validation of every record with the core validator (errors by record number)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr
import pandas as pd

from core.data.inspect import add_entry, upload_file, validate_entry, validate_file
from core.data.registry import dataset_kind, load_dataset_info, save_dataset_info
from core.errors import UserError
from core.redaction import redact
from webui.guard import inside
from webui.i18n import t

COLUMNS = ["name", "file_name", "formatting", "kind", "ranking", "columns"]


def registry_frame(data_dir: str) -> tuple[pd.DataFrame, str]:
    try:
        entries = load_dataset_info(Path(data_dir), check_files=False)
    except UserError as e:
        return pd.DataFrame(columns=COLUMNS), str(e)
    rows = [{"name": n, "file_name": e.file_name, "formatting": e.formatting, "kind": dataset_kind(e),
             "ranking": e.ranking, "columns": json.dumps(e.columns.model_dump(exclude_none=True))}
            for n, e in entries.items()]
    return pd.DataFrame(rows, columns=COLUMNS), ""


def errors_frame(errors: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"record": e.get("record"), "field": e.get("field"), "message": e.get("message")}
                         for e in errors], columns=["record", "field", "message"])


def box(message: str, ok: bool = False, elem: str = "") -> str:
    css = "ok-box" if ok else "error-box"
    return f"<div class='{css}' id='{elem}'>{html.escape(redact(message))}</div>" if message else ""


def build(ui, data_dir: Path) -> None:
    def root(d) -> Path:
        """The data directory typed in the box, refused unless inside --data-dir."""
        return inside(data_dir, d or data_dir, "data directory", "--data-dir")

    max_upload = ui.max_upload_mb * 2**20
    ddir = ui.text(gr.Textbox(value=str(data_dir), elem_id="ds-data-dir"), "data_dir")
    frame, err = registry_frame(str(data_dir))
    table = ui.text(gr.Dataframe(value=frame, interactive=False, elem_id="ds-table", wrap=True), "registry")
    message = gr.HTML(box(err), elem_id="ds-message")
    with gr.Row():
        name = ui.text(gr.Dropdown(choices=list(frame["name"]), allow_custom_value=True, elem_id="ds-name"),
                       "entry_name")
        file_name = ui.text(gr.Textbox(elem_id="ds-file-name"), "file_name")
        formatting = ui.text(gr.Dropdown(choices=["alpaca", "sharegpt", "openai"], value="alpaca",
                                         elem_id="ds-formatting"), "formatting")
        ranking = ui.text(gr.Checkbox(value=False, elem_id="ds-ranking"), "ranking")
    with gr.Row():
        columns = ui.text(gr.Code(language="json", value="{}", elem_id="ds-columns", interactive=True), "columns")
        tags = ui.text(gr.Code(language="json", value="{}", elem_id="ds-tags", interactive=True), "tags")
    with gr.Row():
        upload = ui.text(gr.File(file_types=[".json", ".jsonl", ".csv", ".parquet"], elem_id="ds-upload"), "upload")
        with gr.Column():
            b_save = ui.text(gr.Button("Save entry", variant="primary", elem_id="btn-ds-save"), "btn_add_entry", "value")
            b_delete = ui.text(gr.Button("Delete entry", variant="stop", elem_id="btn-ds-delete"),
                               "btn_delete_entry", "value")
            b_validate = ui.text(gr.Button("Validate", elem_id="btn-ds-validate"), "btn_validate", "value")
    summary = gr.HTML(elem_id="ds-validate-summary")
    errors = gr.Dataframe(value=errors_frame([]), interactive=False, elem_id="ds-errors", wrap=True)

    def refresh(d):
        try:
            d = root(d)
        except UserError as e:
            return gr.skip(), gr.skip(), box(str(e))
        f, e = registry_frame(str(d))
        return f, gr.update(choices=list(f["name"])), box(e)

    ddir.change(refresh, ddir, [table, name, message])

    def pick(d, n):
        try:
            entry = load_dataset_info(root(d), check_files=False).get(n)
        except UserError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), box(str(e))
        if entry is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
        return (entry.file_name, entry.formatting, entry.ranking,
                json.dumps(entry.columns.model_dump(exclude_none=True), indent=1),
                json.dumps(entry.tags.model_dump(exclude_none=True), indent=1), "")

    name.change(pick, [ddir, name], [file_name, formatting, ranking, columns, tags, message])

    def on_upload(d, file):
        if file is None:
            return gr.skip(), ""
        src = Path(file if isinstance(file, str) else file.name)
        try:
            path = upload_file(root(d), src, max_bytes=max_upload, overwrite=True)
        except UserError as e:
            return gr.skip(), box(str(e))
        finally:  # Gradio's own copy in its temp folder: the data directory holds the only one
            if Path(ui.upload_cache).resolve() in src.resolve().parents:
                src.unlink(missing_ok=True)
        return path.name, box(t("msg_saved", ui.lang, path=path), ok=True)

    upload.upload(on_upload, [ddir, upload], [file_name, message])

    def save(d, n, fname, fmt, rank, cols, tgs):
        try:
            cols_v, tags_v = json.loads(cols or "{}"), json.loads(tgs or "{}")
        except json.JSONDecodeError as e:
            return gr.skip(), gr.skip(), box(f"columns/tags: not valid JSON ({e.msg})")
        try:
            add_entry(root(d), (n or "").strip(), file_name=fname, formatting=fmt, columns=cols_v or None,
                      tags=tags_v or None, ranking=bool(rank), overwrite=True)
        except UserError as e:
            return gr.skip(), gr.skip(), box(str(e))
        f, _ = registry_frame(str(root(d)))
        return f, gr.update(choices=list(f["name"])), box(t("msg_saved", ui.lang, path=n), ok=True)

    b_save.click(save, [ddir, name, file_name, formatting, ranking, columns, tags], [table, name, message])

    def delete(d, n):
        try:
            d = root(d)
            entries = load_dataset_info(d, check_files=False)
            if n in entries:
                del entries[n]
                save_dataset_info(d, entries)
        except UserError as e:
            return gr.skip(), gr.skip(), box(str(e))
        f, _ = registry_frame(str(d))
        return f, gr.update(choices=list(f["name"]), value=None), ""

    b_delete.click(delete, [ddir, name], [table, name, message])

    def validate(d, n, fname, fmt):
        try:
            d = root(d)
            registered = n in load_dataset_info(d, check_files=False)
            if not registered and fname:
                target = inside(d, fname, "file_name", "--data-dir")
        except UserError as e:
            return box(str(e)), errors_frame([])
        if registered:
            errs = validate_entry(d, n)
        elif fname:
            errs = validate_file(target, formatting=fmt)
        else:
            return box("Pick a dataset or upload a file first."), errors_frame([])
        if errs:
            return box(t("valid_errors", ui.lang, n=len(errs)), elem="ds-invalid"), errors_frame(errs)
        return box(t("valid_ok", ui.lang, n="✓"), ok=True, elem="ds-valid"), errors_frame([])

    b_validate.click(validate, [ddir, name, file_name, formatting], [summary, errors])
