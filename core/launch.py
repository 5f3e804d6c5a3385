"""How a run is started: the command line and environment for `python -m core.run <yaml>`.

One process for now (CPU or one GPU); several devices through `accelerate launch` are the
distributed issue's job and plug in here, so the CLI, the Python API and the web UI all start
runs the same way. Never a shell: the command is an argv list.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from core.params import LLMTrainingParams

# After a stop request (Ctrl+C, the web UI's abort) a run gets this long to save a checkpoint
# and exit before it is killed. Env AITRAINING_STOP_GRACE_S overrides it.
STOP_GRACE_S = float(os.environ.get("AITRAINING_STOP_GRACE_S", 60))


def build_command(params: LLMTrainingParams, config_path: str | os.PathLike) -> list[str]:
    """argv that trains the run described by config_path."""
    return [sys.executable, "-m", "core.run", str(Path(config_path).resolve())]


def build_env(params: LLMTrainingParams, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the run: secrets travel here, never through the YAML."""
    env = dict(os.environ if base is None else base)
    from core import ROOT

    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if params.token is not None:
        env["HF_TOKEN"] = params.token.get_secret_value()
    return env
