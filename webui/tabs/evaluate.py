"""Evaluate & Predict tab: `aitraining eval` on the top bar's model + adapter over a dataset, in a
child process (the page stays responsive and the model's memory is returned when it ends); shows
the metrics and a preview of the predictions beside their references."""
from __future__ import annotations

import html
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import gradio as gr
import pandas as pd

from core.evaluate import METRICS, PREDICTIONS_FILE, RESULTS_FILE
from webui.i18n import t

PREVIEW_ROWS = 50
PREVIEW_COLUMNS = ["prompt", "prediction", "reference", "stopped"]


def eval_command(model: Optional[str], adapter: Optional[str], data_path: str, out: Path, *, split: str,
                 dataset_dir: Optional[str], template: Optional[str], metrics: list[str], max_samples,
                 max_new_tokens, temperature, top_p, batch_size) -> list[str]:
    """The `python -m core.cli eval ...` argument list (no shell)."""
    cmd = [sys.executable, "-m", "core.cli", "eval", "--data-path", data_path, "--output", str(out),
           "--split", split or "train", "--metrics", ",".join(metrics or METRICS),
           "--max-new-tokens", str(int(max_new_tokens)), "--temperature", str(float(temperature)),
           "--top-p", str(float(top_p)), "--batch-size", str(int(batch_size))]
    if model:
        cmd += ["--model", model]
    if adapter:
        cmd += ["--adapter", adapter]
    if dataset_dir:
        cmd += ["--dataset-dir", dataset_dir]
    if template and template != "auto":
        cmd += ["--chat-template", template]
    if max_samples:
        cmd += ["--max-samples", str(int(max_samples))]
    return cmd


def metrics_frame(result: dict) -> pd.DataFrame:
    rows = [{"metric": k, "value": v} for k, v in (result.get("metrics") or {}).items() if v is not None]
    return pd.DataFrame(rows, columns=["metric", "value"])


def predictions_frame(path: Path, limit: int = PREVIEW_ROWS) -> pd.DataFrame:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if len(rows) >= limit:
                    break
                rows.append(json.loads(line))
    except (OSError, ValueError):
        pass
    return pd.DataFrame(rows, columns=PREVIEW_COLUMNS)


def build(ui) -> None:
    from webui.tabs.train import dataset_choices

    names, _ = dataset_choices(str(ui.data_dir), "default")
    with gr.Row():
        data = ui.text(gr.Dropdown(choices=names, value=names[0] if names else None, allow_custom_value=True,
                                   elem_id="eval-data", scale=2), "eval_data")
        split = ui.text(gr.Textbox(value="train", elem_id="eval-split"), "eval_split")
        max_samples = ui.text(gr.Number(value=32, precision=0, minimum=0, elem_id="eval-max-samples"),
                              "eval_max_samples")
        metrics = ui.text(gr.CheckboxGroup(choices=list(METRICS), value=list(METRICS), elem_id="eval-metrics"),
                          "eval_metric_choice")
    with gr.Row():
        max_new = ui.text(gr.Slider(1, 1024, value=64, step=1, elem_id="eval-max-new"), "max_new_tokens")
        temp = ui.text(gr.Slider(0, 2, value=0.0, step=0.05, elem_id="eval-temperature"), "temperature")
        top_p = ui.text(gr.Slider(0.05, 1, value=1.0, step=0.05, elem_id="eval-top-p"), "top_p")
        batch = ui.text(gr.Number(value=8, precision=0, minimum=1, elem_id="eval-batch"), "eval_batch")
    with gr.Row():
        out_dir = ui.text(gr.Textbox(elem_id="eval-output", scale=3), "eval_output")
        b_run = ui.text(gr.Button("Evaluate", variant="primary", elem_id="btn-eval", scale=1), "btn_eval", "value")
    status = gr.HTML(elem_id="eval-status")
    with gr.Row():
        table = ui.text(gr.Dataframe(interactive=False, elem_id="eval-metrics-table", scale=1), "eval_results")
        preview = ui.text(gr.Dataframe(interactive=False, wrap=True, elem_id="eval-predictions", scale=3),
                          "eval_predictions")

    def run(model, adapter, template, data_path, split_name, n, mets, new_tokens, temperature, p, bsz, out):
        if not data_path:
            yield f"<div class='error-box'>{html.escape(t('eval_no_data', ui.lang))}</div>", gr.skip(), gr.skip()
            return
        out = Path(out) if out else ui.runs_root / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = eval_command(model, adapter, data_path, out, split=split_name, dataset_dir=str(ui.data_dir),
                           template=template, metrics=mets, max_samples=n, max_new_tokens=new_tokens,
                           temperature=temperature, top_p=p, batch_size=bsz)
        repo = Path(__file__).resolve().parents[2]
        with open(out / "console.log", "wb") as console:
            proc = subprocess.Popen(cmd, cwd=repo, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.time()
        while proc.poll() is None:
            yield (f"<div id='eval-running'>{html.escape(t('eval_running', ui.lang, seconds=int(time.time() - started)))}"
                   "</div>", gr.skip(), gr.skip())
            time.sleep(1.0)
        if proc.returncode != 0:
            tail = (out / "console.log").read_text(encoding="utf-8", errors="replace")[-1500:]
            yield f"<div class='error-box' id='eval-error'><pre>{html.escape(tail)}</pre></div>", gr.skip(), gr.skip()
            return
        result = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
        msg = t("eval_done", ui.lang, n=result["n_examples"], path=str(out / PREDICTIONS_FILE))
        yield (f"<div class='ok-box' id='eval-done'>{html.escape(msg)}</div>", metrics_frame(result),
               predictions_frame(out / PREDICTIONS_FILE))

    b_run.click(run, [ui.fields["model"], ui.fields["adapter_path"], ui.fields["chat_template"], data, split,
                      max_samples, metrics, max_new, temp, top_p, batch, out_dir], [status, table, preview])
