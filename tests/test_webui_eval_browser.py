"""The Evaluate & Predict tab in a real browser: the top bar's model over a registered dataset, run
as `aitraining eval` in a child process; the page shows the metrics and the predictions."""
import json
import time
from pathlib import Path

import pytest

from test_webui_browser import Page, browser, server  # noqa: F401 (fixtures)


@pytest.mark.slow  # a UI server, a browser and one evaluation subprocess (~40 s here)
def test_evaluate_tab_runs_eval_and_shows_metrics_and_predictions(server, browser, tmp_path):  # noqa: F811
    ui = Page(browser, server["url"], tmp_path / "screens")
    ui.type_choice("model", server["model"])
    ui.pick("chat_template", "chatml")
    ui.pg.get_by_role("tab", name="Evaluate & Predict").click()
    out = tmp_path / "eval-out"
    ui.pg.locator("#eval-max-samples input").fill("4")
    ui.pg.locator("#eval-output textarea, #eval-output input").first.fill(str(out))
    ui.pg.locator("#btn-eval").click()
    ui.pg.wait_for_selector("#eval-running, #eval-done", timeout=60_000)  # progress while it runs
    started = time.time()
    ui.pg.wait_for_selector("#eval-done, #eval-error", timeout=240_000)
    ui.shot("eval-done")
    assert ui.pg.locator("#eval-error").count() == 0, ui.pg.locator("#eval-error").inner_text()
    result = json.loads((out / "eval_results.json").read_text())
    assert result["n_examples"] == 4 and result["template"] == "chatml"
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    metrics_text = ui.pg.locator("#eval-metrics-table").inner_text()
    for name in ("bleu", "rouge1", "accuracy", "perplexity"):
        assert name in metrics_text, metrics_text
    preview = ui.pg.locator("#eval-predictions").inner_text()
    assert rows[0]["reference"][:20] in preview
    assert "4 predictions" in ui.pg.locator("#eval-done").inner_text()
    assert time.time() - started < 240
