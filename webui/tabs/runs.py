"""Runs tab: every run directory under the runs root with its state and final loss; open one to
watch its log and curve, or load its settings into the form."""
from __future__ import annotations

import time

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
