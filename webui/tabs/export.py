"""Export tab: merge a LoRA adapter into its base model and save safetensors shards. The merge
runs in a child process so its memory is returned when it ends."""
from __future__ import annotations

import html
import multiprocessing as mp
from pathlib import Path

import gradio as gr

from core.redaction import redact
from webui.guard import inside
from webui.i18n import t


def _merge(adapter: str, out: str, shard: str, queue) -> None:
    try:
        from core.model.export import merge_adapter_dir

        queue.put(("ok", str(merge_adapter_dir(adapter, out, max_shard_size=shard))))
    except Exception as e:  # reported to the page, not raised in the worker
        queue.put(("error", f"{type(e).__name__}: {e}"))


def merge_in_worker(adapter: str, out: str, shard: str, timeout: float = 3600) -> str:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_merge, args=(adapter, out, shard, queue), daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        raise RuntimeError(f"export did not finish within {timeout:.0f} s")
    if queue.empty():
        raise RuntimeError(f"export worker exited with code {proc.exitcode} without a result")
    kind, value = queue.get()
    if kind == "error":
        raise RuntimeError(value)
    return value


def build(ui) -> None:
    with gr.Row():
        out_dir = ui.text(gr.Textbox(elem_id="export-dir"), "export_dir")
        shard = ui.text(gr.Dropdown(choices=["500MB", "1GB", "2GB", "5GB", "10GB"], value="2GB",
                                    allow_custom_value=True, elem_id="export-shard"), "shard_size")
        b_export = ui.text(gr.Button("Export", variant="primary", elem_id="btn-export"), "btn_export", "value")
    result = gr.HTML(elem_id="export-result")

    def export_with_shard(adapter, out, shard_size):
        if not adapter:
            return "<div class='error-box'>Choose an adapter (a finished LoRA run) in the top bar first.</div>"
        out = out or str(Path(adapter) / "exported")
        try:  # written only under --runs-dir
            out = str(inside(ui.runs_root, out, "export directory", "--runs-dir", allow_root=False))
            path = merge_in_worker(adapter, out, shard_size or "2GB")
        except Exception as e:
            return f"<div class='error-box'>{html.escape(redact(str(e)))}</div>"
        return f"<div class='ok-box' id='export-done'>{html.escape(t('export_done', ui.lang, path=path))}</div>"

    b_export.click(export_with_shard, [ui.fields["adapter_path"], out_dir, shard], result)
