"""Python API: `Project(params, backend="local", process=True).create()` runs one training run.

    from core import LLMTrainingParams, Project
    Project(LLMTrainingParams(model=..., data_path=..., project_name=..., peft=True)).create()

create() writes <project_name>/config.yaml, then trains: in a child process (process=True, the
default, as the CLI and the web UI do) or in this process (process=False). Returns the exit code.
"""
from __future__ import annotations

import collections
import subprocess
import sys
import threading
from pathlib import Path

from core import config_io
from core.errors import ConfigError
from core import launch
from core.params import LLMTrainingParams


class Project:
    def __init__(self, params: LLMTrainingParams, backend: str = "local", process: bool = True):
        if backend != "local" or params.backend != "local":
            raise ConfigError(f"backend '{params.backend if backend == 'local' else backend}' is not "
                              "available in this build (no network); use backend local")
        self.params = params
        self.process = process
        self.run_dir = Path(params.project_name)

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    def check(self) -> None:
        """Refuse what cannot run before any compute is spent."""
        from core.stages import STAGES
        p = self.params
        # Options whose machinery has not landed yet are refused, never silently ignored.
        pending = {"--use-sweep": p.use_sweep,
                   "--use-enhanced-eval": p.use_enhanced_eval, "--push-to-hub": p.push_to_hub}
        for flag, asked in pending.items():
            if asked:
                raise ConfigError(f"{flag} is not available in this version yet; drop it (the run itself "
                                  "does not need it)")
        # Read and validate the data now: a malformed record is reported in seconds, with its
        # file and record number, instead of after the model has loaded in the child process.
        from core.stages.common import load_records

        load_records(self.params, kind=STAGES[self.params.stage].data_kind)

    def write_config(self) -> Path:
        self.check()
        return config_io.save(self.params, self.config_path)

    def create(self) -> int:
        path = self.write_config()
        if not self.process:
            from core.run import train

            return train(self.params, self.run_dir)
        cmd, env = launch.prepare(self.params, path)
        several = launch.is_multi_process(cmd)
        # Several processes: the launcher's failure report (which rank died, why) is read from
        # its stderr, which is passed through to the terminal as it comes.
        child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE if several else None)
        tail: collections.deque = collections.deque(maxlen=400)
        copier = None
        if several:
            copier = threading.Thread(target=_copy_lines, args=(child.stderr, tail), daemon=True)
            copier.start()
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                # Ctrl+C reached the child too: it saves a checkpoint and exits; wait for it
                # instead of killing it mid-save (a second Ctrl+C during the wait does the same).
                print("Interrupted: the run is saving a checkpoint before it stops...", flush=True)
        if copier is not None:
            copier.join(timeout=5)
        launch.finish(self.run_dir, code, "".join(tail))
        return code


def _copy_lines(stream, tail) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        tail.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()
