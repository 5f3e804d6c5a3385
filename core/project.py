"""Python API: `Project(params, backend="local", process=True).create()` runs one training run.

    from core import LLMTrainingParams, Project
    Project(LLMTrainingParams(model=..., data_path=..., project_name=..., peft=True)).create()

create() writes <project_name>/config.yaml, then trains: in a child process (process=True, the
default, as the CLI and the web UI do) or in this process (process=False). Returns the exit code.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from core import config_io
from core.errors import ConfigError
from core.launch import build_command, build_env
from core.params import LLMTrainingParams


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Project:
    def __init__(self, params: LLMTrainingParams, backend: str = "local", process: bool = True):
        if backend != "local" or params.backend != "local":
            raise ConfigError(f"backend '{params.backend if backend == 'local' else backend}' is not "
                              "available in this build (no network); use backend local")
        self.params = params
        self.process = process
        self.run_dir = Path(params.project_name)
        self.estimate = None     # core.model.memory.Estimate, set by check()
        self.notes: list[str] = []  # what check() decided (a batch size found, checkpointing on)

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    def check(self) -> None:
        """Refuse what cannot run before any compute is spent."""
        from core.stages import STAGES
        p = self.params
        # Options whose machinery has not landed yet are refused, never silently ignored.
        pending = {"--distributed-backend deepspeed":
                   p.distributed_backend == "deepspeed", "--use-sweep": p.use_sweep,
                   "--use-enhanced-eval": p.use_enhanced_eval, "--push-to-hub": p.push_to_hub}
        for flag, asked in pending.items():
            if asked:
                raise ConfigError(f"{flag} is not available in this version yet; drop it (the run itself "
                                  "does not need it)")
        # Read and validate the data now: a malformed record is reported in seconds, with its
        # file and record number, instead of after the model has loaded in the child process.
        from core.stages.common import load_records

        train, _ = load_records(self.params, kind=STAGES[self.params.stage].data_kind)
        self.check_memory(train)

    def check_memory(self, records=None) -> None:
        """Estimate peak memory and step time (self.estimate); with --auto-find-batch-size pick the
        largest batch that fits; refuse a run that will not fit unless --no-memory-check."""
        from core.model import memory

        p = self.params
        config = memory.config_if_local(p.model, p.trust_remote_code)
        if config is None:  # not converted / downloaded yet: the run itself will tell
            self.estimate = None
            return
        seq = memory.data_seq_len(p, config, records)
        device = "cuda" if _cuda() else "cpu"
        if p.auto_find_batch_size:
            b, ga, _ = memory.find_batch_size(p, config=config, device=device, seq_len=seq,
                                              n_train=len(records) if records else None)
            if (b, ga) != (p.batch_size, p.gradient_accumulation):
                self.notes.append(f"--auto-find-batch-size: batch size {b} with gradient accumulation {ga} "
                                  f"(was {p.batch_size} x {p.gradient_accumulation}), the largest that the "
                                  f"memory estimate fits on {device}")
                self.params = p = memory.with_batch(p, b, ga)
        est = memory.estimate(p, config=config, device=device, seq_len=seq)
        if device == "cpu" and not est.fits and not p.disable_gradient_checkpointing:
            ck = memory.estimate(p, config=config, device=device, seq_len=seq, checkpointing=True)
            if ck.fits:
                self.notes.append("gradient checkpointing on: without it the run would not fit in memory")
                est = ck
        self.estimate = est
        if not est.fits and p.memory_check:
            raise ConfigError(memory.refusal(p, est, config))

    def report(self, file=None) -> None:
        """Print the memory / time estimate and check()'s decisions (to stderr by default)."""
        import sys

        file = file or sys.stderr
        for note in self.notes:
            print(note, file=file)
        if self.estimate is not None:
            print(self.estimate.summary(), file=file)

    def write_config(self) -> Path:
        self.check()
        return config_io.save(self.params, self.config_path)

    def create(self, report: bool = False) -> int:
        path = self.write_config()
        if report:
            self.report()
        if not self.process:
            from core.run import train

            return train(self.params, self.run_dir)
        child = subprocess.Popen(build_command(self.params, path), env=build_env(self.params))
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                # Ctrl+C reached the child too: it saves a checkpoint and exits; wait for it
                # instead of killing it mid-save (a second Ctrl+C during the wait does the same).
                print("Interrupted: the run is saving a checkpoint before it stops...", flush=True)
