"""Hyperparameter sweeps (--use-sweep) with Optuna.

    aitraining llm --train ... --project-name ./models/sweep --use-sweep --sweep-n-trials 8 \
      --sweep-params '{"lr": {"low": 1e-5, "high": 1e-3, "log": true}, "lora_r": [8, 16, 32]}' \
      --sweep-metric eval_loss --sweep-direction minimize

The search space maps any schema field to a range ({"low", "high", optional "type": int|float,
"log", "step"}) or a list of choices (or {"choices": [...]}); JSON or YAML text, or a .json/.yaml
file. Each trial is a complete run in <project>/trial-NNN/ (its own config.yaml, log, status,
model). The parent directory holds sweep.db (the Optuna storage: running the same command again
resumes the sweep), trials.csv / trials.json / trials.md (the table), best.yaml (the best trial's
parameters as a runnable run file) and one trainer_log.jsonl line per finished trial.

Pruning: each trial reports the metric at every evaluation; a trial whose intermediate value is
worse than the median of earlier trials at the same step stops early (Optuna's MedianPruner).
Backends: optuna (TPE), random, grid (every entry must be a list of choices).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError

log = logging.getLogger("aitraining")

DB_FILE = "sweep.db"
BEST_FILE = "best.yaml"
TABLE = ("trials.csv", "trials.json", "trials.md")
EXAMPLE = '{"lr": {"low": 1e-5, "high": 1e-3, "log": true}, "lora_r": [8, 16]}'
# Fields a trial may not change: where it writes, and the sweep itself.
FIXED = {"project_name", "use_sweep", "sweep_backend", "sweep_n_trials", "sweep_metric", "sweep_direction",
         "sweep_params", "token", "resume_from_checkpoint"}


def parse_space(text: str) -> dict[str, dict]:
    """The search space -> {field: {"choices": [...]} | {"low", "high", "type", "log", "step"}}."""
    from core.params import LLMTrainingParams

    src = "--sweep-params"
    path = Path(text.strip()) if len(text) < 1024 and "\n" not in text else None
    if path is not None and path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{src}: file {path} not found")
        src, text = str(path), path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{src}: neither JSON nor YAML ({e}); write it like {EXAMPLE}") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{src}: expected a mapping of parameter -> range or choices, like {EXAMPLE}")
    fields = LLMTrainingParams.model_fields
    space = {}
    for name, spec in doc.items():
        key = str(name).replace("-", "_").lstrip("_")
        if key not in fields:
            raise ConfigError(f"{src}: '{name}' is not a parameter (see aitraining llm --help)")
        if key in FIXED:
            raise ConfigError(f"{src}: '{name}' cannot be swept (a trial's directory and the sweep settings "
                              "are fixed)")
        if isinstance(spec, list):
            spec = {"choices": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{src}: '{name}' must be a list of choices or {{\"low\": .., \"high\": ..}}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{src}: '{name}'.choices must be a non-empty list")
            space[key] = {"choices": spec["choices"]}
            continue
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{src}: '{name}' needs numeric low and high (or choices), e.g. "
                              '{"low": 1e-5, "high": 1e-3}') from None
        if not low < high:
            raise ConfigError(f"{src}: '{name}': low ({low}) must be below high ({high})")
        kind = spec.get("type") or ("int" if fields[key].annotation is int else "float")
        if kind not in ("int", "float"):
            raise ConfigError(f"{src}: '{name}'.type must be int or float, not {kind!r}")
        log_scale = bool(spec.get("log", False))
        if log_scale and low <= 0:
            raise ConfigError(f"{src}: '{name}': a log scale needs low > 0")
        entry = {"type": kind, "low": int(low) if kind == "int" else low,
                 "high": int(high) if kind == "int" else high, "log": log_scale}
        if spec.get("step") is not None:
            entry["step"] = spec["step"]
        space[key] = entry
    return space


def check(params) -> None:
    """Refuse a sweep that cannot run, before any trial."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("--use-sweep needs optuna: pip install optuna")
    if not params.sweep_params:
        raise ConfigError(f"--use-sweep needs --sweep-params, the search space, e.g. '{EXAMPLE}'")
    space = parse_space(params.sweep_params)
    if params.sweep_backend == "grid" and any("choices" not in s for s in space.values()):
        raise ConfigError("--sweep-backend grid needs a list of choices for every parameter in --sweep-params")
    if params.sweep_metric.startswith("eval_") and not (params.valid_split or params.val_size):
        raise ConfigError(f"--sweep-metric {params.sweep_metric} is measured on validation data: add "
                          "--valid-split or --val-size (or sweep on train_loss)")
    if params.sweep_metric.startswith("eval_") and params.eval_strategy == "no":
        log.warning("--sweep-metric %s with --eval-strategy no: trials are scored at the end only, "
                    "nothing can be pruned", params.sweep_metric)


def _suggest(trial, name: str, spec: dict):
    if "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec["log"], step=spec.get("step", 1))
    return trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"], step=spec.get("step"))


def _metric(values: dict, name: str):
    for key in (name, f"eval_{name}", f"train_{name}"):
        v = values.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


def _prune_callback(trial, metric: str):
    from transformers import TrainerCallback

    class PruneCallback(TrainerCallback):
        pruned = False

        def _report(self, values, step, control):
            value = _metric(values or {}, metric)
            if value is None or self.pruned:
                return
            trial.report(value, step)
            if trial.should_prune():
                log.info("sweep: trial %d pruned at step %d (%s=%.4g)", trial.number, step, metric, value)
                self.pruned = True
                control.should_training_stop = True

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self._report(metrics, state.global_step, control)

        def on_log(self, args, state, control, logs=None, **kw):
            if not metric.startswith("eval_") and logs and "loss" in logs:
                self._report({metric: logs["loss"]}, state.global_step, control)

    return PruneCallback()


def run_sweep(params, run_dir: Path) -> dict:
    """Run the remaining trials of the sweep in run_dir (resuming its storage), then write the
    table and best.yaml. Returns the parent's final metrics."""
    import optuna

    from core import config_io
    from core.events import STOP, read_status, write_status
    from core.params import LLMTrainingParams
    from core.run import train
    from core.stages import common

    check(params)
    run_dir = Path(run_dir)
    space = parse_space(params.sweep_params)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = {"optuna": lambda: optuna.samplers.TPESampler(seed=params.seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=params.seed),
                "grid": lambda: optuna.samplers.GridSampler({k: v["choices"] for k, v in space.items()},
                                                            seed=params.seed)}
    study = optuna.create_study(
        study_name="sweep", storage=f"sqlite:///{(run_dir / DB_FILE).resolve()}", load_if_exists=True,
        sampler=samplers[params.sweep_backend](), direction=params.sweep_direction,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):  # cut short by an interruption
        study.tell(t.number, state=states.FAIL)
    done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    if done:
        log.info("sweep: resuming %s, %d of %d trials done", run_dir / DB_FILE, done, params.sweep_n_trials)
    base = params.model_dump()
    for _ in range(max(0, params.sweep_n_trials - done)):
        if STOP.is_set():
            break
        trial = study.ask()
        values = {name: _suggest(trial, name, spec) for name, spec in space.items()}
        child_dir = run_dir / f"trial-{trial.number:03d}"
        trial.set_user_attr("run", str(child_dir))
        try:
            child = LLMTrainingParams(**{**base, **values, "project_name": str(child_dir), "use_sweep": False,
                                         "resume_from_checkpoint": None})
        except Exception as e:  # a sampled combination the schema refuses
            log.warning("sweep: trial %d skipped, parameters %s are invalid: %s", trial.number, values, e)
            study.tell(trial, state=states.FAIL)
            continue
        log.info("sweep: trial %d/%d %s -> %s", trial.number + 1, params.sweep_n_trials, values, child_dir)
        pruner = _prune_callback(trial, params.sweep_metric)
        common.TRIAL_CALLBACKS[:] = [pruner]
        started = time.time()
        try:
            code = train(child, child_dir, console=False)
        finally:
            common.TRIAL_CALLBACKS.clear()
        value = _metric(read_status(child_dir).get("metrics") or {}, params.sweep_metric)
        trial.set_user_attr("seconds", round(time.time() - started, 1))
        if pruner.pruned:
            study.tell(trial, state=states.PRUNED)
            write_status(child_dir, sweep_state="pruned")
        elif code != 0 or value is None:
            log.warning("sweep: trial %d gave no %s (exit %s); marked failed", trial.number,
                        params.sweep_metric, code)
            study.tell(trial, state=states.FAIL)
        else:
            study.tell(trial, value)
        rows = write_table(study, run_dir, params.sweep_metric)
        finished = len([r for r in rows if r["state"] in ("COMPLETE", "PRUNED")])
        with open(run_dir / "trainer_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": finished, "total_steps": params.sweep_n_trials, "trial": trial.number,
                                "sweep_value": value, "percentage": round(100 * finished / params.sweep_n_trials, 2)})
                    + "\n")
        write_status(run_dir, step=finished, total_steps=params.sweep_n_trials)
    rows = write_table(study, run_dir, params.sweep_metric)
    complete = [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))]
    if not complete:
        raise ConfigError(f"sweep: no trial finished with a {params.sweep_metric} value; see the trials' "
                          f"running.log under {run_dir}")
    best = study.best_trial
    best_params = config_io.load(Path(best.user_attrs["run"]) / "config.yaml")
    best_params = best_params.model_copy(update={"project_name": str(run_dir / "best")})
    config_io.save(best_params, run_dir / BEST_FILE)
    log.info("sweep: best trial %d, %s=%.6g, params %s; rerun with aitraining --config %s", best.number,
             params.sweep_metric, best.value, best.params, run_dir / BEST_FILE)
    return {"best_trial": best.number, f"best_{params.sweep_metric}": best.value, "trials": len(rows),
            "best_run": best.user_attrs["run"], "best_params": json.dumps(best.params)}


def write_table(study, run_dir: Path, metric: str) -> list[dict]:
    """trials.csv / trials.json / trials.md in the parent directory; returns the rows."""
    from core.config_io import atomic_write

    rows = []
    names = sorted({k for t in study.trials for k in t.params})
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name, metric: t.value,
               **{k: t.params.get(k) for k in names}, "seconds": t.user_attrs.get("seconds"),
               "run": t.user_attrs.get("run")}
        rows.append(row)
    try:
        best = study.best_trial.number
    except ValueError:
        best = None
    for r in rows:
        r["best"] = r["trial"] == best
    cols = ["trial", "state", metric, *names, "seconds", "best", "run"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write(run_dir / TABLE[0], buf.getvalue())
    atomic_write(run_dir / TABLE[1], json.dumps({"metric": metric, "direction": study.direction.name.lower(),
                                                 "best_trial": best, "trials": rows}, indent=2))
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    atomic_write(run_dir / TABLE[2], "\n".join(md) + "\n")
    return rows


def read_trials(run_dir) -> dict[str, Any] | None:
    """trials.json of a sweep directory (for the web UI), or None."""
    try:
        return json.loads((Path(run_dir) / TABLE[1]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
