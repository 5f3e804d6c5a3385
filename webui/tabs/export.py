"""Export tab: merge a LoRA adapter into its base model (or re-save a model) as safetensors shards,
optionally int8/int4 through bitsandbytes, GGUF files with an Ollama Modelfile, and a push to a
private hub repo. The work runs in a child process so its memory is returned when it ends."""
from __future__ import annotations

import html
import multiprocessing as mp
from pathlib import Path

import gradio as gr

from core.redaction import redact
from webui.guard import inside
from webui.i18n import t


def _export(job: dict, queue) -> None:
    try:
        from core.model.export import export_model

        token = job.pop("token", None)
        push_user = job.pop("push_user", None)
        written = export_model(**job)
        result = {"model": str(written["model"]), "gguf": [str(p) for p in written["gguf"]],
                  "modelfile": str(written["modelfile"]) if written["modelfile"] else None}
        if push_user:
            from core.model import hub

            repo_id = hub.repo_id_for(push_user, str(Path(job["out_dir"]).resolve()))
            card = hub.model_card(repo_id, base_model=job.get("source"))
            result["pushed"] = hub.push_folder(job["out_dir"], repo_id, token=token, private=True, card=card)
        queue.put(("ok", result))
    except Exception as e:  # reported to the page, not raised in the worker
        queue.put(("error", f"{type(e).__name__}: {e}" if type(e).__module__ != "core.errors" else str(e)))


def export_in_worker(job: dict, timeout: float = 3600) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_export, args=(job, queue), daemon=True)
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
    from core.model.gguf_export import OUTTYPES

    with gr.Row():
        out_dir = ui.text(gr.Textbox(elem_id="export-dir"), "export_dir")
        shard = ui.text(gr.Dropdown(choices=["500MB", "1GB", "2GB", "5GB", "10GB"], value="2GB",
                                    allow_custom_value=True, elem_id="export-shard"), "shard_size")
        device = ui.text(gr.Dropdown(choices=["cpu", "auto"], value="cpu", elem_id="export-device"), "export_device")
        quant = ui.text(gr.Dropdown(choices=["none", "int8", "int4"], value="none", elem_id="export-quant"),
                        "export_quantization")
    with gr.Row():
        gguf = ui.text(gr.CheckboxGroup(choices=list(OUTTYPES), value=[], elem_id="export-gguf"), "export_gguf")
        push = ui.text(gr.Checkbox(value=False, elem_id="export-push"), "export_push")
        user = ui.text(gr.Textbox(elem_id="export-username"), "export_username")
        token = ui.text(gr.Textbox(type="password", elem_id="export-token"), "export_token")
    b_export = ui.text(gr.Button("Export", variant="primary", elem_id="btn-export"), "btn_export", "value")
    result = gr.HTML(elem_id="export-result")

    def run_export(model, adapter, out, shard_size, device_choice, quantization, gguf_types, do_push, username,
                   hub_token):
        source = adapter or model
        if not source:
            return "<div class='error-box'>Choose a model, or an adapter (a finished LoRA run), in the top bar first.</div>"
        if do_push and not (username or "").strip():
            return "<div class='error-box'>Pushing needs the hub username (the repo is username/export-name).</div>"
        out = out or str(Path(source) / "exported")
        try:  # written only under --runs-dir
            out = str(inside(ui.runs_root, out, "export directory", "--runs-dir", allow_root=False))
        except Exception as e:
            return f"<div class='error-box'>{html.escape(redact(str(e)))}</div>"
        job = dict(source=None if adapter else source, adapter=adapter or None, out_dir=out,
                   max_shard_size=shard_size or "2GB", device=device_choice if device_choice != "auto" else _auto(),
                   quantization=None if quantization in (None, "none") else quantization,
                   gguf=list(gguf_types or []), push_user=(username or "").strip() if do_push else None,
                   token=(hub_token or None) if do_push else None)
        try:
            done = export_in_worker(job)
        except Exception as e:
            return f"<div class='error-box'>{html.escape(redact(str(e)))}</div>"
        lines = [t("export_done", ui.lang, path=done["model"])] + done["gguf"]
        if done.get("modelfile"):
            lines.append(done["modelfile"])
        if done.get("pushed"):
            lines.append(done["pushed"])
        return "<div class='ok-box' id='export-done'>" + "<br>".join(html.escape(x) for x in lines) + "</div>"

    b_export.click(run_export, [ui.fields["model"], ui.fields["adapter_path"], out_dir, shard, device, quant, gguf,
                                push, user, token], result)


def _auto() -> str:
    from core.model.loader import pick_device

    return pick_device()
