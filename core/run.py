"""The training process: `python -m core.run <config.yaml>`.

Reads the run file, runs its stage, and keeps the run directory truthful: config.yaml (what
reproduces the run), running.log, status.json (pending/running/finished/failed/aborted with the
error), trainer_log.jsonl, loss.png, checkpoints and the trained model. SIGTERM and Ctrl+C save a
checkpoint, then stop with status aborted.

Under a distributed launcher every rank runs this module; only global rank 0 writes the run
directory (the other ranks log to the console with their rank), and a stop request reaching any
rank stops all of them at the same step.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from core import config_io
from core.errors import UserError
from core.events import STOP, is_main_process, rank, write_status
from core.params import LLMTrainingParams

log = logging.getLogger("aitraining")


def _setup_logging(run_dir: Path) -> list[tuple[logging.Logger, logging.Handler]]:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handler = None
    if is_main_process():
        handler = logging.FileHandler(run_dir / "running.log", encoding="utf-8")
        handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank()}] " if "WORLD_SIZE" in os.environ else ""
    console.setFormatter(logging.Formatter(prefix + "%(levelname)s %(message)s"))
    added = []
    for name in ("aitraining", "transformers", "peft", "trl", "datasets", "accelerate"):
        lg = logging.getLogger(name)
        if handler is not None:
            lg.addHandler(handler)
            added.append((lg, handler))
        if name == "aitraining":
            lg.addHandler(console)
            added.append((lg, console))
            lg.setLevel(logging.INFO)
            lg.propagate = False
    return added


_first_signal = 0.0
SIGNAL_REPEAT_S = 3.0  # a process-group signal and the launcher's forwarded copy are one request


def _on_stop_signal(signum, frame):
    global _first_signal
    if STOP.is_set() and time.time() - _first_signal > SIGNAL_REPEAT_S:  # a later signal: the user insists
        raise KeyboardInterrupt
    if STOP.is_set():
        return
    _first_signal = time.time()
    STOP.set()
    log.warning("stop requested (%s): saving a checkpoint, then stopping", signal.Signals(signum).name)


def train(params: LLMTrainingParams, run_dir: str | os.PathLike) -> int:
    """Run one training job in this process; returns the exit code (0 finished or aborted)."""
    from core.stages import STAGES

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    if not config_path.exists() and is_main_process():
        config_io.save(params, config_path)
    handlers = _setup_logging(run_dir)
    if is_main_process():
        _write_environment(run_dir)
    STOP.clear()
    previous = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    write_status(run_dir, "running", started=time.time(), pid=os.getpid(), pgid=os.getpgid(0),
                 stage=params.stage, error=None)
    try:
        log.info("run %s: trainer %s, model %s, data %s", run_dir, params.trainer, params.model, params.data_path)
        metrics = STAGES[params.stage].runner()(params, run_dir)
    except UserError as e:
        log.error("%s", e)
        write_status(run_dir, "failed", error=str(e))
        return e.exit_code
    except KeyboardInterrupt:
        write_status(run_dir, "aborted", error="interrupted twice: stopped without a final checkpoint")
        return 130
    except Exception as e:  # a bug or an environment failure: full traceback in running.log
        log.error("training failed%s: %s: %s\n%s", f" on rank {rank()}" if rank() else "", type(e).__name__, e,
                  traceback.format_exc())
        write_status(run_dir, "failed", error=f"{type(e).__name__}: {e} (details in running.log)")
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for logger, h in handlers:
            logger.removeHandler(h)
            h.close()
    state = "aborted" if STOP.is_set() else "finished"
    clean = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}
    write_status(run_dir, state, finished=time.time(), metrics=clean)
    log.info("run %s: %s", state, run_dir)
    return 0


def _write_environment(run_dir: Path) -> None:
    """accelerate env into the run directory: what a bug report about this run needs."""
    from core.config_io import atomic_write
    from core.launch import ACCELERATE_ENV, accelerate_env

    try:
        world = os.environ.get("WORLD_SIZE", "1")
        atomic_write(run_dir / ACCELERATE_ENV, f"processes: {world}\n" + accelerate_env() + "\n")
    except Exception as e:  # never fail a run over its diagnostics
        log.warning("could not record accelerate env: %s", e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m core.run <config.yaml>", file=sys.stderr)
        return 2
    try:
        params = config_io.load(argv[0])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    run_dir = Path(params.project_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if Path(argv[0]).resolve() != (run_dir / "config.yaml").resolve() and is_main_process():
        config_io.save(params, run_dir / "config.yaml")
    return train(params, run_dir)


if __name__ == "__main__":
    sys.exit(main())
