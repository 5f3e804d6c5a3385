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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.errors import UserError
from core.events import LOG_FILE, read_log, read_status, write_status
from core import launch
from core.params import LLMTrainingParams
from core.project import Project

CONSOLE_FILE = "console.log"
ABORT_GRACE_S = 60.0  # time to save a checkpoint after SIGTERM before SIGKILL


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
    from transformers.trainer_utils import get_last_checkpoint

    if not run_dir.is_dir():
        return None
    last = get_last_checkpoint(str(run_dir))
    return Path(last) if last else None


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


@dataclass
class Monitor:
    """What a browser session has read of a run: the log offset and the records so far."""

    run_dir: Optional[Path] = None
    offset: int = 0
    records: list = field(default_factory=list)
    inode: Optional[int] = None  # of the log read so far: a replaced log starts over
    state: str = ""  # the run state last shown, to act once when it changes

    def follow(self, run_dir: Optional[Path]) -> None:
        if run_dir != self.run_dir:
            self.run_dir, self.offset, self.records, self.inode, self.state = run_dir, 0, [], None, ""

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
            self.offset, self.records = 0, []
        self.inode = inode
        new, self.offset = read_log(path, self.offset)
        self.records.extend(new)
        return new


class Runner:
    """Starts one run at a time and knows which run is active, across browser sessions."""

    def __init__(self, runs_root: Path):
        self.runs_root = Path(runs_root)
        self.proc: Optional[subprocess.Popen] = None
        self.run_dir: Optional[Path] = None
        self.lock = threading.Lock()

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
