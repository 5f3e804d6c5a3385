"""Runs tab: every run directory under the runs root with its state and final loss; open one to
watch its log and curve, or load its settings into the form."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from core.errors import UserError
from webui.guard import inside
from webui.runner import list_runs
from webui.tabs.train import error_html

COLUMNS = ["run", "state", "step", "total", "loss", "updated", "error"]


def runs_frame(root) -> pd.DataFrame:
    rows = list_runs(root)
    for r in rows:
        r["updated"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated"])) if r["updated"] else ""
    return pd.DataFrame(rows, columns=COLUMNS)


def sweep_view(run, lang: str = "en") -> tuple[pd.DataFrame, str]:
    """A sweep directory's trials table and a line on its best trial ('' when not a sweep)."""
    from core.sweep import BEST_FILE, read_trials
    from webui.i18n import t

    doc = read_trials(run) if run else None
    if not doc:
        return pd.DataFrame(), ""
    frame = pd.DataFrame(doc["trials"])
    best = next((r for r in doc["trials"] if r.get("best")), None)
    if best is None:
        return frame, ""
    params = {k: v for k, v in best.items() if k not in ("trial", "state", doc["metric"], "seconds", "best", "run")}
    return frame, t("sweep_best", lang, trial=best["trial"], metric=doc["metric"], value=best[doc["metric"]],
                    params=json.dumps(params), run=best["run"], yaml=str(Path(run) / BEST_FILE))


def samples_view(run) -> tuple[pd.DataFrame, str]:
    """The post-training check of a run: its samples.jsonl and the warnings from status.json."""
    from core.evaluate import SAMPLES_FILE
    from core.events import read_status

    if not run or not (Path(run) / SAMPLES_FILE).is_file():
        return pd.DataFrame(), ""
    rows = [json.loads(x) for x in (Path(run) / SAMPLES_FILE).read_text(encoding="utf-8").splitlines() if x.strip()]
    warnings = (read_status(run).get("post_check") or {}).get("warnings") or []
    note = "".join(f"<div class='error-box'>{html.escape(w)}</div>" for w in warnings)
    return pd.DataFrame(rows, columns=["prompt", "prediction", "reference", "stopped", "new_tokens"]), note


def build(ui) -> None:
    table = ui.text(gr.Dataframe(value=runs_frame(ui.runs_root), interactive=False, elem_id="runs-table"),
                    "runs_table")
    with gr.Row():
        refresh = gr.Button("↻", elem_id="btn-runs-refresh", size="sm", scale=0)
        pick = ui.text(gr.Dropdown(choices=[r["run"] for r in list_runs(ui.runs_root)], elem_id="runs-pick",
                                   allow_custom_value=True), "run_col")
        open_btn = ui.text(gr.Button("Open run", elem_id="btn-open-run"), "open_run", "value")

    def do_refresh():
        frame = runs_frame(ui.runs_root)
        return frame, gr.update(choices=list(frame["run"]))

    refresh.click(do_refresh, None, [table, pick])
    with gr.Row():
        with gr.Column():
            trials = ui.text(gr.Dataframe(interactive=False, elem_id="sweep-trials"), "sweep_trials")
            best = gr.Markdown(elem_id="sweep-best")
        with gr.Column():
            samples = ui.text(gr.Dataframe(interactive=False, wrap=True, elem_id="run-samples"), "run_samples")
            check = gr.HTML(elem_id="run-check")

    def details(run):
        frame, best_line = sweep_view(run, ui.lang)
        rows, note = samples_view(run)
        return frame, best_line, rows, note

    pick.change(details, pick, [trials, best, samples, check])

    # Opening a run: the monitor follows it and the form shows its settings.
    on_load, inputs = ui.extra["on_load"]

    def open_run(run):
        from core import config_io
        from webui import form

        if not run:
            return [gr.skip()] + [gr.skip()] * len(inputs)
        try:  # only run directories under --runs-dir can be opened
            run = str(inside(ui.runs_root, run, "run", "--runs-dir", allow_root=False))
        except UserError as e:
            return [gr.skip()] * (1 + len(inputs)) + [error_html(str(e))]
        try:
            values = form.params_to_values(config_io.load(f"{run}/config.yaml"))
            field_values = [values[n] for n in form.form_fields()]
        except Exception:  # an old or foreign config: still show its curve and log
            field_values = [gr.skip()] * len(inputs)
        return [run] + field_values + [""]

    open_btn.click(open_run, pick, [ui.extra["followed"], *inputs, ui.extra["train_message"]])
