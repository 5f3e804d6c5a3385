"""Train tab: stage, data, hyper-parameters, the run buttons and the live monitor."""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Optional

import gradio as gr
import numpy as np
import pandas as pd

from core import DATA_DIR, config_io
from core.cli import command_line
from core.errors import UserError
from core.redaction import redact, register
from core.params import GROUPS, TRAINER_STAGE, LLMTrainingParams
from core.stages import STAGES
from webui import form
from webui.i18n import group_title, t
from webui.guard import confine, inside
from webui.runner import PLOT_POINTS, Monitor, Runner, describe, last_checkpoint, tail, thin

def stage_choices(lang: str) -> list[tuple[str, str]]:
    return [(f"{trainer} — {STAGES[stage].title}" if trainer == stage or trainer == "default" else trainer, trainer)
            for trainer, stage in TRAINER_STAGE.items()]


def dataset_choices(data_dir: str, trainer: str) -> tuple[list[str], str]:
    """Registered datasets fitting the trainer's data kind, and an error message ('' if none)."""
    from core.data.registry import dataset_kind, load_dataset_info

    want = STAGES[TRAINER_STAGE.get(trainer, "sft")].data_kind
    try:
        entries = load_dataset_info(Path(data_dir or DATA_DIR), check_files=False)
    except UserError as e:
        return [], str(e)
    ok = {want} | ({"text"} if want == "sft" else set())
    return [n for n, e in entries.items() if dataset_kind(e) in ok], ""


def error_html(message: str) -> str:
    return f"<div class='error-box'>{html.escape(redact(message))}</div>" if message else ""


def fmt_seconds(s) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_html(info: dict, last: Optional[dict], lang: str) -> str:
    if not info:
        return f"<div id='run-progress'>{t('status_idle', lang)}</div>"
    state = info.get("state", "")
    step, total = (last or {}).get("step", info.get("step") or 0), (last or {}).get("total_steps") or info.get("total") or 0
    pct = 100.0 * step / total if total else 0.0
    key = {"running": "status_running", "pending": "status_running", "finished": "status_finished",
           "aborted": "status_aborted"}.get(state, "status_failed")
    state_text = t(key, lang, error=redact(info.get("error") or ""))
    parts = [t("step", lang, step=step, total=total or "?"),
             t("elapsed", lang, elapsed=fmt_seconds((last or {}).get("elapsed"))),
             t("remaining", lang, remaining=fmt_seconds((last or {}).get("remaining")))]
    if last and last.get("tokens_per_second"):
        parts.append(t("tokens_per_s", lang, tps=f"{last['tokens_per_second']:.0f}"))
    css = "error-box" if key == "status_failed" else ""
    return (f"<div id='run-progress' data-state='{html.escape(state)}' data-step='{step}' data-total='{total}'>"
            f"<div class='{css}'><b id='run-state'>{html.escape(state_text)}</b> · {html.escape(info.get('run', ''))}</div>"
            f"<div class='progress-outer'><div class='progress-inner' style='width:{pct:.1f}%'></div></div>"
            f"<div>{' · '.join(html.escape(p) for p in parts)}</div></div>")


def plot_frame(mon: Monitor, metric: str, max_points: int = PLOT_POINTS) -> pd.DataFrame:
    """The chosen metric's curves for the plot, thinned to about max_points points each (a long
    run is drawn from its envelope, not from every logged step)."""
    if metric == "loss":
        curves = [("loss", mon.series.get("loss")), ("smoothed", mon.smoothed), ("eval_loss", mon.series.get("eval_loss"))]
    else:
        curves = [(metric, mon.series.get(metric))]
    steps, values, names = [], [], []
    for name, series in curves:
        if series is None or not len(series):
            continue
        s, v = thin(series, max_points)
        steps += s
        values += v
        names += [name] * len(s)
    # explicit dtypes: an empty first frame must not make the plot treat the axes as categories
    return pd.DataFrame({"step": np.array(steps, dtype=np.int64), "value": np.array(values, dtype=np.float64),
                         "series": pd.array(names, dtype="string")})


def monitor_tick(runner: Runner, mon: Monitor, follow: Optional[str], metric_name: str, lang: str) -> dict:
    """One refresh of the monitor, without Gradio: reads the log's new bytes only, the status and
    the log tail. Returns the run followed, the progress HTML, the log text, the plot frame (None
    when nothing new) and the metric choices (None when unchanged)."""
    target = runner.active() or (Path(follow) if follow else None) or runner.last()
    mon.follow(target)
    new = mon.poll()
    info = describe(target)
    log_text = redact(tail(target / "running.log")) if target else ""
    return {"target": target, "info": info, "progress": progress_html(info, mon.last, lang), "log": log_text,
            "plot": plot_frame(mon, metric_name) if new or not mon.count else None,
            "metrics": mon.metrics() if new else None}


def device_summary() -> str:
    """The GPUs this server's runs can use (CUDA_VISIBLE_DEVICES applies), or CPU."""
    import torch

    n = torch.cuda.device_count()
    if not n:
        return "CPU"
    return f"{n} GPU: " + ", ".join(f"{i} {torch.cuda.get_device_name(i)}" for i in range(n))


# The fields whose change redraws the memory / time estimate.
ESTIMATE_INPUTS = ("model", "finetuning_type", "quantization", "batch_size", "block_size", "gradient_accumulation",
                   "data_path", "mixed_precision", "lora_r", "target_modules", "optimizer", "packing",
                   "max_memory_gb", "disable_gradient_checkpointing", "freeze_trainable_layers")


def estimate_markdown(p: LLMTrainingParams, lang: str) -> str:
    """The train tab's estimate line for these parameters (check()'s numbers, in the UI's language)."""
    from core.errors import ConfigError
    from core.model.memory import GIB, fmt_s
    from core.project import Project

    from core.stages.common import load_records

    project = Project(p.model_copy(update={"memory_check": True}))
    try:
        records, _ = load_records(p, kind=STAGES[p.stage].data_kind)
    except UserError:  # the data's own errors show in the preview; estimate from the block size
        records = None
    try:
        project.check_memory(records)
    except ConfigError as e:
        return t("estimate_too_big", lang, message=str(e))
    est = project.estimate
    if est is None:
        return t("estimate_unknown", lang)
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    text = t("estimate", lang, peak=g(est.total), available=g(est.available or 0), device=est.device,
             weights=g(est.weights), state=g(est.gradients + est.optimizer), activations=g(est.activations),
             batch=est.batch_size, tokens=est.seq_len, step=fmt_s(est.step_seconds),
             ckpt=t("estimate_checkpointing", lang) if est.checkpointing else "")
    return "\n\n".join([text, *project.notes])


def build(ui) -> None:
    lang = ui.lang
    with gr.Row():
        trainer = ui.widget("trainer", choices=stage_choices(lang))
        data_dir = ui.widget("dataset_dir", value=str(ui.data_dir))
        names, err = dataset_choices(str(ui.data_dir), "default")
        data_path = ui.widget("data_path", choices=names, multiselect=True, allow_custom_value=True,
                              value=["identity"], scale=2)
    registry_error = gr.HTML(error_html(err), elem_id="registry-error")
    with ui.text(gr.Accordion("Preview dataset", open=False, elem_id="preview-acc"), "preview"):
        with gr.Row():
            preview_btn = ui.text(gr.Button("Preview dataset", elem_id="btn-preview", size="sm"), "preview", "value")
            page = ui.text(gr.Number(value=0, precision=0, minimum=0, elem_id="preview-page"), "preview_page")
        preview_html = gr.HTML(elem_id="preview-html")
    with gr.Row():
        for name in ("lr", "epochs", "max_grad_norm", "max_samples", "mixed_precision"):
            ui.widget(name)
    with gr.Row():
        for name in ("block_size", "batch_size", "gradient_accumulation", "val_size", "scheduler"):
            ui.widget(name)
    for group in GROUPS:
        names_in = form.accordion_fields(group)
        if not names_in:
            continue
        acc = gr.Accordion(group_title(group, lang), open=False, elem_id=f"acc-{group}")
        ui.translations.append((acc, lambda lg, g=group: gr.update(label=group_title(g, lg))))
        with acc:
            for i in range(0, len(names_in), 4):
                with gr.Row():
                    for name in names_in[i:i + 4]:
                        ui.widget(name)
    with gr.Row():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir = ui.widget("project_name", value=str(ui.runs_root / f"run-{stamp}"), scale=3)
        ui.text(gr.Textbox(value=device_summary(), interactive=False, elem_id="device-count"), "device_count")
    with gr.Row():  # several devices: which ones, how many processes, which backend / ZeRO stage
        for name in ("distributed_backend", "devices", "num_processes", "deepspeed_stage"):
            ui.widget(name)
    resume_md = gr.Markdown(elem_id="resume-info")
    estimate_md = gr.Markdown(elem_id="memory-estimate")
    with gr.Row():
        b_cmd = ui.text(gr.Button("Preview command", elem_id="btn-preview-cmd"), "btn_preview_cmd", "value")
        b_save = ui.text(gr.Button("Save arguments", elem_id="btn-save"), "btn_save", "value")
        saved = gr.Dropdown(choices=saved_args(ui.runs_root), elem_id="saved-args", allow_custom_value=True)
        ui.text(saved, "btn_load")
        b_load = ui.text(gr.Button("Load arguments", elem_id="btn-load"), "btn_load", "value")
        b_export = ui.text(gr.Button("Export YAML", elem_id="btn-export-yaml"), "btn_export_yaml", "value")
        b_import = ui.text(gr.UploadButton("Import YAML", file_types=[".yaml", ".yml"], elem_id="btn-import-yaml"),
                           "btn_import_yaml", "label")
    with gr.Row():
        b_start = ui.text(gr.Button("Start", variant="primary", elem_id="btn-start"), "btn_start", "value")
        b_resume = gr.Button("Resume", elem_id="btn-resume", visible=False)
        b_abort = ui.text(gr.Button("Abort", variant="stop", elem_id="btn-abort"), "btn_abort", "value")
    yaml_file = gr.File(visible=False, elem_id="export-yaml-file", interactive=False)
    message = gr.HTML(elem_id="train-message")
    with gr.Row():
        command = ui.text(gr.Code(language="shell", elem_id="command", interactive=False, max_lines=6), "command")
        run_yaml = ui.text(gr.Code(language="yaml", elem_id="run-yaml", interactive=False, max_lines=14), "yaml")
    progress = gr.HTML(progress_html({}, None, lang), elem_id="progress")
    with gr.Row():
        log_box = ui.text(gr.Textbox(lines=16, max_lines=16, autoscroll=True, interactive=False,
                                     elem_id="log-tail"), "log")
        with gr.Column():
            metric = ui.text(gr.Dropdown(choices=["loss"], value="loss", elem_id="metric"), "metric")
            plot = ui.text(gr.LinePlot(x="step", y="value", color="series", elem_id="loss-plot", height=320),
                           "loss_plot")
    monitor = gr.State(Monitor())
    followed = gr.State(None)  # a past run opened from the Runs tab (str), else the active one
    timer = gr.Timer(1.0)
    ui.extra.update(followed=followed, monitor=monitor, train_message=message)

    inputs = ui.field_inputs()

    def params_from(args) -> LLMTrainingParams:
        """The form as parameters, with the run inside --runs-dir and the data inside --data-dir."""
        values = ui.values(args)
        register(values.get("token"))  # typed into the form: masked wherever it could be echoed
        return confine(form.values_to_params(values), ui.runs_root, ui.data_dir)

    # -- data ---------------------------------------------------------------------------------
    def refresh_datasets(ddir, trainer_value, current):
        names, err = dataset_choices(ddir, trainer_value)
        keep = [c for c in (current or []) if c in names or "/" in c or "." in c]
        return gr.update(choices=names, value=keep), error_html(err)

    trainer.change(refresh_datasets, [data_dir, trainer, data_path], [data_path, registry_error])
    data_dir.change(refresh_datasets, [data_dir, trainer, data_path], [data_path, registry_error])

    def do_preview(page_no, *args):
        from core.data.inspect import preview
        from core.stages.common import load_tokenizer_and_template

        try:
            p = params_from(args)
            _, tok, template, _ = load_tokenizer_and_template(p)
            kind = STAGES[p.stage].data_kind
            res = preview(p.data_path, data_dir=Path(p.dataset_dir or DATA_DIR), kind=kind, page=int(page_no or 0),
                          page_size=3, tokenizer=tok, chat_template=template, cutoff_len=p.block_size if
                          p.block_size > 0 else p.model_max_length, train_on_prompt=p.train_on_prompt,
                          mask_history=p.mask_history,
                          placeholders={"name": p.identity_name, "author": p.identity_author},
                          text_column=p.text_column, prompt_text_column=p.prompt_text_column,
                          rejected_text_column=p.rejected_text_column, column_mapping=p.column_mapping)
        except UserError as e:
            return error_html(str(e))
        blocks = [f"<p>{res['total']} records · {t('preview_page', ui.lang)} {res['page'] + 1}/{res['pages']}</p>"]
        for item in res["records"]:
            if item.get("error"):
                blocks.append(error_html(item["error"]["message"]))
                continue
            counts = f"{item.get('num_tokens', 0)} {t('tokens', ui.lang)}, {item.get('num_trained', 0)} " \
                     f"{t('trained_tokens', ui.lang)}"
            blocks.append(f"<div class='preview-record'><small>#{item['index'] + 1} · {counts}</small>"
                          f"<pre style='white-space:pre-wrap'>{item.get('html', '')}</pre></div>")
        return "\n".join(blocks)

    preview_btn.click(do_preview, [page, *inputs], preview_html)
    page.change(do_preview, [page, *inputs], preview_html)

    # -- memory / time estimate ---------------------------------------------------------------
    def show_estimate(lang_value, *args):
        try:
            return estimate_markdown(params_from(args), lang_value or ui.lang)
        except UserError as e:
            return t("estimate_too_big", lang_value or ui.lang, message=str(e))
        except Exception as e:  # an estimate must never break the form
            return f"Estimate unavailable: {type(e).__name__}: {e}"

    for name in ESTIMATE_INPUTS:
        ui.fields[name].change(show_estimate, [ui.extra["lang"], *inputs], estimate_md, show_progress="hidden")
    ui.extra["estimate"] = (show_estimate, [ui.extra["lang"], *inputs], estimate_md)

    # -- arguments ----------------------------------------------------------------------------
    def preview_command(*args):
        try:
            p = params_from(args)
        except UserError as e:
            return gr.skip(), gr.skip(), error_html(str(e))
        return command_line(p), config_io.dumps(p), ""

    b_cmd.click(preview_command, inputs, [command, run_yaml, message])

    def save_form(args) -> Path:
        """The form as a run file under <runs>/.saved_args/ (named after the output directory)."""
        p = params_from(args)
        return config_io.save(p, args_dir(ui.runs_root) / f"{Path(p.project_name).name}.yaml")

    def save_args(*args):
        try:
            path = save_form(args)
        except UserError as e:
            return gr.skip(), error_html(str(e))
        return gr.update(choices=saved_args(ui.runs_root), value=str(path)), t("msg_saved", ui.lang, path=path)

    b_save.click(save_args, inputs, [saved, message])

    def load_args(path, uploaded=False):
        try:
            if not uploaded:  # a saved run file: only from under --runs-dir
                path = inside(ui.runs_root, path or "", "run file", "--runs-dir", allow_root=False)
            p = config_io.load(path)
        except UserError as e:
            return [gr.skip()] * len(inputs) + [error_html(str(e))]
        values = form.params_to_values(p)
        return [values[n] for n in form.form_fields()] + [""]

    b_load.click(load_args, saved, [*inputs, message])

    def export_yaml(*args):
        try:
            path = save_form(args)
        except UserError as e:
            return gr.skip(), error_html(str(e))
        return gr.update(value=str(path), visible=True), ""

    b_export.click(export_yaml, inputs, [yaml_file, message])

    def import_yaml(file):
        return load_args(file if isinstance(file, str) else file.name, uploaded=True)

    b_import.upload(import_yaml, b_import, [*inputs, message])

    # -- resume offer -------------------------------------------------------------------------
    def resume_offer(out):
        try:
            ckpt = last_checkpoint(inside(ui.runs_root, out, "project_name", "--runs-dir")) if out else None
        except UserError:
            ckpt = None  # refused with its message when Start is pressed
        if ckpt is None:
            return "", gr.update(visible=False)
        return (t("resume_info", ui.lang, checkpoint=ckpt),
                gr.update(visible=True, value=t("btn_resume", ui.lang, checkpoint=ckpt.name)))

    out_dir.change(resume_offer, out_dir, [resume_md, b_resume])

    # -- start / abort ------------------------------------------------------------------------
    def start(resume, *args):
        try:
            p = params_from(args)
            if resume:
                p = p.model_copy(update={"resume_from_checkpoint": "auto"})
            run_dir = ui.runner.start(p)
        except UserError as e:
            return error_html(str(e)), None
        return f"<div class='ok-box' id='started'>{html.escape(t('msg_started', ui.lang, run=run_dir))}</div>", None

    b_start.click(lambda *a: start(False, *a), inputs, [message, followed])
    b_resume.click(lambda *a: start(True, *a), inputs, [message, followed])

    def abort():
        run = ui.runner.abort()
        return t("msg_aborting", ui.lang) if run else t("status_idle", ui.lang)

    b_abort.click(abort, None, message)

    # -- monitor ------------------------------------------------------------------------------
    def tick(mon: Monitor, follow, metric_name, lang_value):
        out = monitor_tick(ui.runner, mon, follow, metric_name, lang_value or ui.lang)
        info, target = out["info"], out["target"]
        plot_update = out["plot"] if out["plot"] is not None else gr.skip()
        metric_update = gr.update(choices=out["metrics"]) if out["metrics"] is not None else gr.skip()
        offer = (gr.skip(), gr.skip())
        if info.get("state", "") != mon.state:  # a run just ended (or started): offer to resume it
            mon.state = info.get("state", "")
            offer = resume_offer(str(target)) if mon.state in ("aborted", "failed") else ("", gr.update(visible=False))
        return (mon, out["progress"], out["log"], plot_update, metric_update, *offer)

    timer.tick(tick, [monitor, followed, metric, ui.extra["lang"]],
               [monitor, progress, log_box, plot, metric, resume_md, b_resume], show_progress="hidden")
    metric.change(lambda mon, m: plot_frame(mon, m), [monitor, metric], plot)

    def on_load(*args):
        """A reopened page re-attaches: show the active run's settings in the form."""
        active = ui.runner.active()
        if active is None or not (active / "config.yaml").is_file():
            return [gr.skip()] * len(inputs)
        values = form.params_to_values(config_io.load(active / "config.yaml"))
        return [values[n] for n in form.form_fields()]

    ui.extra["on_load"] = (on_load, inputs)


def args_dir(runs_root: Path) -> Path:
    d = runs_root / ".saved_args"
    d.mkdir(parents=True, exist_ok=True)
    return d


def saved_args(runs_root: Path) -> list[str]:
    return sorted(str(p) for p in args_dir(runs_root).glob("*.yaml"))
