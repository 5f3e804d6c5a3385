"""Checkpoints are complete or absent.

A process killed mid-save (SIGKILL, power cut, full disk) leaves a checkpoint-N directory behind
that must never be resumed from. transformers writes checkpoint-N in place, in this order:
weights, optimizer, scheduler, RNG state, and trainer_state.json last; our PPO loop writes all of
it into a temporary directory and renames it. So trainer_state.json that parses is the completion
mark: a directory without one is partial, and `--resume-from-checkpoint auto` skips and removes it.
Removal renames first (one atomic step), then deletes, so a kill during a removal or a rotation
never leaves a half-deleted directory under a checkpoint name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("aitraining")

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TRASH = ".trash-"


def step_of(path: Path) -> Optional[int]:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: str | os.PathLike) -> bool:
    """The directory holds a finished checkpoint: its trainer_state.json (written last) parses."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint-N directory of the run, oldest first, complete or not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=step_of)


def complete(run_dir: str | os.PathLike) -> list[Path]:
    return [p for p in checkpoints(run_dir) if is_complete(p)]


def last_complete(run_dir: str | os.PathLike) -> Optional[Path]:
    done = complete(run_dir)
    return done[-1] if done else None


def remove(path: Path) -> None:
    """Delete a directory so that no kill leaves it half-deleted under its own name."""
    trash = path.with_name(f"{_TRASH}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:  # another process of the run removed it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean(run_dir: str | os.PathLike) -> list[str]:
    """Remove what a killed process left behind: partial checkpoints, half-removed directories,
    temporary files of atomic writes. Returns the names removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in checkpoints(run_dir):
        if not is_complete(p):
            remove(p)
            removed.append(p.name)
    for p in run_dir.iterdir():
        leftover = p.name.startswith(_TRASH) or (p.name.startswith(".") and p.name.endswith(".tmp")) \
            or (p.name.startswith(".") and p.name.endswith(".tmp.png"))
        if leftover:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.warning("removed what an interrupted run left behind in %s: %s", run_dir, ", ".join(sorted(removed)))
    return removed


def repair_log(path: str | os.PathLike, upto_step: Optional[int] = None) -> int:
    """Make a jsonl log appendable again after a kill: drop a torn last line and, when resuming
    from step upto_step, the records of steps after it (they are trained again). Returns the
    number of lines dropped; rewrites the file atomically only if something changes."""
    from core.config_io import atomic_write

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    keep, dropped = [], 0
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if upto_step is not None and isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] > upto_step:
            dropped += 1
            continue
        keep.append(line)
    if dropped or (data and not data.endswith(b"\n")):
        atomic_write(path, b"".join(line + b"\n" for line in keep).decode("utf-8"))
    return dropped
