"""What a run tells the world: trainer_log.jsonl, status.json and loss.png in the run directory.

The web UI and any other watcher read these files; they never talk to the training process.
Each jsonl line is written with one write() call and status/plot are replaced atomically, so a
reader never sees half a record.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from core import checkpoints
from core.checkpoints import repair_log
from core.config_io import atomic_write
from core.redaction import redact_fields

LOG_FILE = "trainer_log.jsonl"
STATUS_FILE = "status.json"
PLOT_FILE = "loss.png"
PLOT_EVERY_S = 5.0
STATES = ("pending", "running", "finished", "failed", "aborted")

# Set by the signal handlers in core.run: the callback saves a checkpoint and stops training.
STOP = threading.Event()


def rank() -> int:
    """This process's global rank under a distributed launcher (0 when started alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only global rank 0 writes the run directory's log, status and plot."""
    return rank() == 0


def stop_agreed() -> bool:
    """STOP as all ranks see it: a stop request reaching one rank stops every rank at the same
    step, so they save the checkpoint together instead of waiting on each other forever."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return STOP.is_set()
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if STOP.is_set() else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        STOP.set()
    return bool(flag.item())


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_status(run_dir: str | os.PathLike, state: Optional[str] = None, **fields: Any) -> dict:
    """Merge fields into status.json (atomically); state is one of STATES. Ranks other than 0
    of a distributed run leave the file to rank 0."""
    status = read_status(run_dir)
    if not is_main_process():
        return status
    if state is not None:
        assert state in STATES, state
        status["state"] = state
    status.update(redact_fields(fields))  # an error message may quote a token: never in clear
    status["updated"] = time.time()
    atomic_write(Path(run_dir) / STATUS_FILE, json.dumps(status, indent=2, default=str))
    return status


def read_log(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Records appended to a jsonl file since byte `offset`, and the offset to continue from.

    A trailing partial line (a writer mid-write) is left for the next call.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    records = []
    for line in chunk[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records, offset + end


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it)."""
    out, last = [], 0.0
    for i, v in enumerate(values, 1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight ** i))
    return out


def plot_loss(run_dir: str | os.PathLike, records: Optional[list[dict]] = None) -> Optional[Path]:
    """Draw loss.png (raw, smoothed, eval) from the run's log; returns the path, None if no loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if records is None:
        records, _ = read_log(run_dir / LOG_FILE)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.35, marker="o" if len(steps) < 3 else None,
                label="loss")
        ax.plot(steps, smooth(list(losses)), color="#1f77b4", label="loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, color="#d62728", marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    tmp = run_dir / f".{PLOT_FILE}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


class RunLogCallback(TrainerCallback):
    """Writes one jsonl line per log step, keeps status.json current, redraws loss.png,
    and turns a stop request (SIGTERM / Ctrl+C) into save-a-checkpoint-then-stop."""

    def __init__(self, run_dir: str | os.PathLike, stage: str):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.start = time.time()
        self.last_time = self.start
        self.last_tokens = 0
        self.last_step = 0
        self.records: list[dict] = []
        self.last_plot = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.start = self.last_time = time.time()
        self.last_tokens = state.num_input_tokens_seen or 0
        self.last_step = state.global_step
        # a resumed run keeps its curve up to its checkpoint: a torn last line (a kill mid-write)
        # and the steps after the checkpoint (trained again now) are dropped
        if state.is_world_process_zero:
            repair_log(self.run_dir / LOG_FILE, upto_step=state.global_step)
        self.records, _ = read_log(self.run_dir / LOG_FILE)
        write_status(self.run_dir, "running", stage=self.stage, step=state.global_step,
                     total_steps=state.max_steps, pid=os.getpid())

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        elapsed = now - self.start
        done = state.global_step - self.last_step
        total = state.max_steps or 0
        tokens = state.num_input_tokens_seen or 0
        dt = max(now - self.last_time, 1e-9)
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        record = {
            "step": state.global_step,
            "total_steps": total,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": round((tokens - self.last_tokens) / dt, 2) if tokens else None,
            "elapsed": round(elapsed, 2),
            "remaining": round((total - state.global_step) / rate, 2) if rate and total else None,
            "percentage": round(100.0 * state.global_step / total, 2) if total else None,
        }
        # the stage's own metrics (rewards, margins, accuracies...) travel along
        for k, v in logs.items():
            if k not in ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch") and isinstance(v, (int, float)):
                record.setdefault(k, v)
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if "loss" in logs or "eval_loss" in logs:
            self.last_time, self.last_tokens = now, tokens
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)
        write_status(self.run_dir, step=state.global_step, total_steps=total,
                     **({"loss": record["loss"]} if record["loss"] is not None else {}),
                     **({"eval_loss": record["eval_loss"]} if record["eval_loss"] is not None else {}))
        if now - self.last_plot > PLOT_EVERY_S:  # drawing costs ~0.1 s: not on every step
            plot_loss(self.run_dir, self.records)
            self.last_plot = time.time()

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss(self.run_dir, self.records)

    def on_step_end(self, args, state, control, **kw):
        if stop_agreed():
            control.should_save = True
            control.should_training_stop = True
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kw):
        self._before_save(args, state, control)

    def _before_save(self, args, state, control):
        """transformers saves into checkpoint-N in place: an old directory of that name (a fresh
        run over an earlier one's checkpoints) would end up half old, half new if the save were
        interrupted, yet look complete. Remove it first."""
        if control.should_save and state.is_world_process_zero:
            old = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if old.is_dir():
                checkpoints.remove(old)

    def on_save(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        # Rotation happens here, after the new checkpoint is complete (transformers would rotate
        # before its caller knows the save finished), and removes by rename-then-delete.
        keep = getattr(args, "keep_checkpoints", None)
        done = checkpoints.complete(args.output_dir)
        for old in done[:-keep] if keep else []:
            checkpoints.remove(old)
        write_status(self.run_dir, last_checkpoint=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))
