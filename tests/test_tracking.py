"""--log wandb: offline without a W&B login or network, files under the run directory, and
--no-wandb-visualizer silences W&B's terminal output."""
import os

from core import LLMTrainingParams, Project
from core.events import read_status

from conftest import write_alpaca


def test_wandb_logs_offline_into_the_run_dir(tiny_model_dir, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    data = write_alpaca(tmp_path / "train.jsonl", n=4)
    out = tmp_path / "run"
    p = LLMTrainingParams(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer="sft",
                          chat_template="chatml", epochs=1, batch_size=2, gradient_accumulation=1, log="wandb",
                          wandb_visualizer=False, eval_strategy="no", save_strategy="no", logging_steps=1,
                          post_train_check=False, peft=True, merge_adapter=False)
    assert Project(p, process=False).create() == 0
    assert read_status(out)["state"] == "finished"
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_SILENT"] == "true" and os.environ["WANDB_CONSOLE"] == "off"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb dir"
    assert list(runs[0].glob("*.wandb")), list(runs[0].iterdir())  # the offline log `wandb sync` uploads
