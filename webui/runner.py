"""Starting, watching and stopping training runs for the web UI. No Gradio here.

The UI never trains in its own process: it writes <run>/config.yaml and starts `python -m
core.run` (the same launcher as the CLI) in its own process group, without a shell, with its
console output in <run>/console.log. Everything the UI shows comes from the run directory, so a
closed or reloaded browser tab re-attaches to a run that is still going, and so does a restarted
UI server (the run's status.json holds its pid).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from array import array
from pathlib import Path
from typing import Optional

from core.errors import UserError
from core.events import LOG_FILE, read_log, read_status, write_status
from core import launch
from core.launch import STOP_GRACE_S
from core.params import LLMTrainingParams
from core.project import Project

CONSOLE_FILE = "console.log"
# per-record bookkeeping, not curves worth plotting
NOT_METRICS = {"step", "total_steps", "epoch", "elapsed", "remaining", "percentage", "tokens_per_second"}
ABORT_GRACE_S = STOP_GRACE_S  # time to save a checkpoint after SIGTERM before SIGKILL


class BusyError(UserError):
    """A run is already active: one at a time per UI server."""


def pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint (a partial one, from a kill mid-save, does not count)."""
    from core.checkpoints import last_complete

    return last_complete(run_dir)


def tail(path: Path, max_bytes: int = 8000) -> str:
    """The end of a text file, without reading it whole."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        text = text.split("\n", 1)[-1]
    return text


def run_summary(run_dir: Path) -> dict:
    """One row of the runs table: name, state, step, final loss, when."""
    status = read_status(run_dir)
    state = status.get("state", "unknown")
    if state in ("running", "pending") and not pid_alive(status.get("pid")):
        state = "failed"  # the process is gone without saying so (killed, machine restart)
    return {"run": str(run_dir), "state": state, "step": status.get("step"), "total": status.get("total_steps"),
            "loss": status.get("loss"), "updated": status.get("updated"), "error": status.get("error")}


def list_runs(root: Path) -> list[dict]:
    """Run directories under root (depth 1 and 2), newest first."""
    if not root.is_dir():
        return []
    found = {p.parent for p in root.glob("*/config.yaml")} | {p.parent for p in root.glob("*/*/config.yaml")}
    rows = [run_summary(d) for d in found]
    return sorted(rows, key=lambda r: r["updated"] or 0, reverse=True)


PLOT_POINTS = 600  # points per curve sent to the browser: a 10k-step run is drawn from 600
SMOOTH_WEIGHT = 0.9  # as core.events.smooth (TensorBoard's default)


class Series:
    """One metric's (step, value) pairs in compact arrays (16 bytes a point, not a dict a record)."""

    __slots__ = ("steps", "values")

    def __init__(self):
        self.steps, self.values = array("q"), array("d")

    def add(self, step: int, value: float) -> None:
        self.steps.append(int(step))
        self.values.append(float(value))

    def __len__(self) -> int:
        return len(self.values)


def thin(series: Series, max_points: int = PLOT_POINTS) -> tuple[list[int], list[float]]:
    """At most max_points of a series for display: the lowest and the highest value of each of
    ~max_points/2 equal slices (so spikes and the envelope survive), plus the first and the last
    point. Vectorised: ~1 ms for 100k points."""
    import numpy as np

    n = len(series)
    if n <= max_points:
        return list(series.steps), list(series.values)
    values = np.frombuffer(series.values, dtype=np.float64)
    k = (max_points - 4) // 2
    per = n // k
    blocks = values[:k * per].reshape(k, per)
    base = np.arange(k) * per
    parts = [base + blocks.argmin(1), base + blocks.argmax(1), np.array([0, n - 1])]
    if k * per < n:  # the remainder after the equal slices
        rest = values[k * per:]
        parts.append(np.array([k * per + rest.argmin(), k * per + rest.argmax()]))
    idx = np.unique(np.concatenate(parts))
    return np.frombuffer(series.steps, dtype=np.int64)[idx].tolist(), values[idx].tolist()


class Monitor:
    """What a browser session has read of a run: the log offset and compact curves of the
    records so far. A tick reads only the bytes appended since the last one, and keeps the
    smoothed loss incrementally, so its cost does not grow with the length of the run."""

    def __init__(self):
        self.run_dir: Optional[Path] = None
        self.offset = 0
        self.inode: Optional[int] = None  # of the log read so far: a replaced log starts over
        self.state = ""  # the run state last shown, to act once when it changes
        self._reset()

    def _reset(self) -> None:
        self.offset, self.count, self.last = 0, 0, None
        self.series: dict[str, Series] = {}
        self.smoothed = Series()
        self._ema = 0.0

    def follow(self, run_dir: Optional[Path]) -> None:
        if run_dir != self.run_dir:
            self.run_dir, self.inode, self.state = run_dir, None, ""
            self._reset()

    def _add(self, record: dict) -> None:
        self.count += 1
        self.last = record
        step = record.get("step")
        if not isinstance(step, int):
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_METRICS:
                series = self.series.get(key)
                if series is None:
                    series = self.series[key] = Series()
                series.add(step, value)
        loss = record.get("loss")
        if isinstance(loss, (int, float)):
            n = len(self.smoothed) + 1
            self._ema = SMOOTH_WEIGHT * self._ema + (1 - SMOOTH_WEIGHT) * loss
            self.smoothed.add(step, self._ema / (1 - SMOOTH_WEIGHT ** n))

    def poll(self) -> list[dict]:
        """New records since the last poll (reads only the new bytes)."""
        if self.run_dir is None:
            return []
        path = self.run_dir / LOG_FILE
        try:
            st = path.stat()
            size, inode = st.st_size, st.st_ino
        except OSError:
            size, inode = 0, None
        # a fresh start in the same directory replaces the log: read the new one from its start
        if size < self.offset or (self.inode is not None and inode is not None and inode != self.inode):
            self._reset()
        self.inode = inode
        new, self.offset = read_log(path, self.offset)
        for record in new:
            self._add(record)
        return new

    def metrics(self) -> list[str]:
        """Metrics the run logs, for the plot's selector: loss first."""
        return ["loss"] + sorted(set(self.series) - {"loss", "eval_loss"})


class Runner:
    """Starts one run at a time and knows which run is active, across browser sessions."""

    def __init__(self, runs_root: Path, data_root: Optional[Path] = None):
        self.runs_root = Path(runs_root)
        self.data_root = Path(data_root) if data_root is not None else None
        self.proc: Optional[subprocess.Popen] = None
        self.run_dir: Optional[Path] = None
        self.lock = threading.Lock()
        # held from the busy check to the spawn: two Start clicks in two browsers at the same
        # moment must not both pass the check
        self.starting = threading.Lock()

    # -- state ------------------------------------------------------------------------------
    def active(self) -> Optional[Path]:
        """The run directory of the active run, re-attaching to one started before a UI restart."""
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                return self.run_dir
            if self.proc is not None:  # finished: reap it and remember the directory for display
                self.proc = None
            if self.run_dir is not None and pid_alive(read_status(self.run_dir).get("pid")) and \
                    read_status(self.run_dir).get("state") in ("running", "pending"):
                return self.run_dir
            for row in list_runs(self.runs_root):
                if row["state"] in ("running", "pending"):
                    self.run_dir = Path(row["run"])
                    return self.run_dir
            return None

    def last(self) -> Optional[Path]:
        """The active run, else the last run this server started."""
        return self.active() or self.run_dir

    # -- start / abort ----------------------------------------------------------------------
    def start(self, params: LLMTrainingParams) -> Path:
        """Validate, write <run>/config.yaml and spawn the run; BusyError while another one runs.
        The run directory must lie inside the runs root (and the data inside data_root, if set)."""
        from webui.guard import confine

        params = confine(params, self.runs_root, self.data_root)
        if not self.starting.acquire(blocking=False):
            raise BusyError("another run is being started right now; wait for it, then try again")
        try:
            return self._start(params)
        finally:
            self.starting.release()

    def _start(self, params: LLMTrainingParams) -> Path:
        busy = self.active()
        if busy is not None:
            raise BusyError(f"a run is already active ({busy}); abort it or wait for it to finish")
        project = Project(params)
        config = project.write_config()  # validates the stage, the data and writes config.yaml
        run_dir = project.run_dir
        if not params.resume_from_checkpoint:  # a fresh start draws a fresh curve
            (run_dir / LOG_FILE).unlink(missing_ok=True)
        write_status(run_dir, "pending", error=None, step=0, total_steps=None, loss=None, eval_loss=None,
                     pid=None, started=time.time())
        cmd, env = launch.prepare(params, config)
        console = open(run_dir / CONSOLE_FILE, "ab")
        start = console.tell()
        with self.lock:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
            self.run_dir = run_dir
        console.close()
        write_status(run_dir, pid=self.proc.pid, pgid=self.proc.pid)
        threading.Thread(target=self._finish, args=(self.proc, run_dir, start), daemon=True).start()
        return run_dir

    @staticmethod
    def _finish(proc: subprocess.Popen, run_dir: Path, start: int) -> None:
        """When the run's command exits, make its status say why (e.g. which rank died)."""
        code = proc.wait()
        try:
            with open(run_dir / CONSOLE_FILE, "rb") as f:
                f.seek(start)
                output = f.read()[-200_000:].decode("utf-8", errors="replace")
        except OSError:
            output = ""
        launch.finish(run_dir, code, output)

    def abort(self, grace: float = ABORT_GRACE_S) -> Optional[Path]:
        """SIGTERM to the run's process group (it saves a checkpoint and exits), SIGKILL after grace.
        Returns at once; a watcher thread enforces the grace period."""
        run_dir = self.active()
        if run_dir is None:
            return None
        status = read_status(run_dir)
        # the process group: the launcher and every rank it started (a run of several processes
        # writes its rank 0's pid, which is not the group's leader)
        pid = status.get("pgid") or status.get("pid") or (self.proc.pid if self.proc else None)
        if not pid:
            return None
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return run_dir
        threading.Thread(target=self._reap, args=(pid, grace, run_dir), daemon=True).start()
        return run_dir

    def _reap(self, pgid: int, grace: float, run_dir: Path) -> None:
        deadline = time.time() + grace
        while time.time() < deadline:
            if self.proc is not None and self.proc.pid == pgid:
                self.proc.poll()
            if not group_alive(pgid):
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.pid == pgid:
            self.proc.wait()
        if read_status(run_dir).get("state") in ("running", "pending"):
            write_status(run_dir, "aborted", error="stopped from the web UI")


def describe(run_dir: Optional[Path]) -> dict:
    """Status plus derived display fields for the monitor."""
    if run_dir is None:
        return {}
    row = run_summary(run_dir)
    status = read_status(run_dir)
    return {**status, **row, "checkpoint": str(last_checkpoint(run_dir) or "")}


def read_config(run_dir: Path) -> Optional[str]:
    try:
        return (run_dir / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        return None
