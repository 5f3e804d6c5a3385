"""--use-sweep with Optuna: trials are child runs, the parent gets the table and a runnable best.yaml,
and running again resumes from the sqlite storage. Also the search-space parser's errors."""
import csv
import json

import pytest

from core import LLMTrainingParams, Project, config_io
from core.errors import ConfigError
from core.events import read_log, read_status
from core.sweep import parse_space

from conftest import write_alpaca


def sweep_params(tiny_model_dir, data, out, **kw):
    base = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer="sft",
                chat_template="chatml", epochs=1, batch_size=2, gradient_accumulation=1, warmup_ratio=0.0,
                val_size=2, eval_strategy="epoch", save_strategy="no", log="none", peft=True,
                post_train_check=False, merge_adapter=False, use_sweep=True, sweep_backend="optuna",
                sweep_n_trials=3, sweep_metric="eval_loss", sweep_direction="minimize",
                sweep_params=json.dumps({"lr": {"low": 1e-4, "high": 5e-2, "log": True}, "lora_r": [4, 8]}))
    base.update(kw)
    return LLMTrainingParams(**base)


@pytest.mark.slow  # four tiny trainings, ~40 s on a loaded 2-core machine
def test_sweep_runs_trials_picks_the_best_and_resumes(tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "train.jsonl")
    out = tmp_path / "sweep"
    assert Project(sweep_params(tiny_model_dir, data, out), process=False).create() == 0

    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert done and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}, rows
    # every trial is a complete run of its own, with the sampled values in its config
    for r in rows:
        child = config_io.load(out / f"trial-{int(r['trial']):03d}" / "config.yaml")
        assert child.lr == pytest.approx(float(r["lr"])) and child.lora_r == int(r["lora_r"])
        assert not child.use_sweep
        status = read_status(out / f"trial-{int(r['trial']):03d}")
        if r["state"] == "COMPLETE":
            assert status["metrics"]["eval_loss"] == pytest.approx(float(r["eval_loss"]))
    best_row = min(done, key=lambda r: float(r["eval_loss"]))
    for r in rows:  # a pruned trial (worse than the median at its evaluation) is never the best
        if r["state"] == "PRUNED":
            assert read_status(out / f"trial-{int(r['trial']):03d}")["sweep_state"] == "pruned"
            assert float(r["eval_loss"]) > float(best_row["eval_loss"])
    table = json.loads((out / "trials.json").read_text())
    assert table["best_trial"] == int(best_row["trial"])
    assert [r["best"] for r in table["trials"]] == [r["trial"] == int(best_row["trial"]) for r in table["trials"]]
    assert "| trial | state | eval_loss |" in (out / "trials.md").read_text()
    # best.yaml: a runnable run file with the best trial's values
    best = config_io.load(out / "best.yaml")
    assert best.lr == pytest.approx(float(best_row["lr"])) and best.lora_r == int(best_row["lora_r"])
    assert not best.use_sweep and best.project_name == str(out / "best")
    status = read_status(out)
    assert status["state"] == "finished" and status["metrics"]["best_trial"] == int(best_row["trial"])
    # the web UI's runs tab shows the same table and names the best trial and best.yaml
    from webui.tabs.runs import sweep_view

    frame, line = sweep_view(str(out))
    assert list(frame["trial"]) == [0, 1, 2]
    assert f"Best trial {best_row['trial']}" in line and str(out / "best.yaml") in line
    progress, _ = read_log(out / "trainer_log.jsonl")
    assert [r["step"] for r in progress] == [1, 2, 3] and progress[-1]["percentage"] == 100.0

    # resume: the same sweep asked for 4 trials runs only the missing one
    assert Project(sweep_params(tiny_model_dir, data, out, sweep_n_trials=4), process=False).create() == 0
    table = json.loads((out / "trials.json").read_text())
    assert [r["trial"] for r in table["trials"]] == [0, 1, 2, 3]
    assert (out / "trial-003" / "config.yaml").is_file() and not (out / "trial-004").exists()


def test_search_space_errors_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match="'lrr' is not a parameter"):
        parse_space('{"lrr": {"low": 1, "high": 2}}')
    with pytest.raises(ConfigError, match="'lr': low .* must be below high"):
        parse_space('{"lr": {"low": 0.1, "high": 0.01}}')
    with pytest.raises(ConfigError, match="'project_name' cannot be swept"):
        parse_space('{"project_name": ["a", "b"]}')
    # YAML text and a file work too
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 0.0001, high: 0.01, log: true}\nepochs: [1, 2]\n")
    assert parse_space(str(path)) == {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                      "epochs": {"choices": [1, 2]}}
    with pytest.raises(ValueError, match="not a parameter"):  # validated with the schema
        LLMTrainingParams(use_sweep=True, sweep_params='{"nope": [1]}')


def test_sweep_on_eval_metric_needs_validation_data(tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "train.jsonl")
    p = sweep_params(tiny_model_dir, data, tmp_path / "s", val_size=0.0)
    with pytest.raises(ConfigError, match="--valid-split or --val-size"):
        Project(p, process=False).create()
