"""Experiment tracking beyond what transformers' own integrations write.

--log tensorboard: transformers' TensorBoardCallback writes loss, learning rate, grad norm and
every eval metric (enhanced-eval ones included) to <run>/tensorboard. TrackingCallback adds the
process memory (and the accelerator's, when there is one) as scalars, and the post-training
generation samples as text, into the same directory.
--log wandb: offline unless W&B is configured and reachable (WANDB_MODE wins when set);
--no-wandb-visualizer keeps the W&B terminal output quiet (WANDB_SILENT / console off).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("aitraining")
TB_DIR = "tensorboard"
ENHANCED = ("perplexity", "bleu", "rouge1", "rouge2", "rougeL", "accuracy", "stopped_fraction")


def tensorboard_dir(run_dir) -> Path:
    return Path(run_dir) / TB_DIR


def _wandb_reachable(timeout: float = 1.5) -> bool:
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def configure_wandb(params) -> None:
    """Environment for wandb before the trainer starts it (nothing is overridden that the user set)."""
    if "WANDB_MODE" not in os.environ:
        configured = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file()
        offline = bool(os.environ.get("HF_HUB_OFFLINE")) or not configured or not _wandb_reachable()
        os.environ["WANDB_MODE"] = "offline" if offline else "online"
        if offline:
            log.info("--log wandb: no W&B login or no network, logging offline into %s/wandb "
                     "(upload later with `wandb sync`)", params.project_name)
    os.environ.setdefault("WANDB_DIR", str(Path(params.project_name)))
    os.environ.setdefault("WANDB_PROJECT", "aitraining")
    if not params.wandb_visualizer:
        os.environ["WANDB_SILENT"] = "true"
        os.environ["WANDB_CONSOLE"] = "off"


def memory_mb() -> dict[str, float]:
    import torch

    out = {}
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["memory/rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        out["memory/gpu_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["memory/gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


class TrackingCallback(TrainerCallback):
    """Memory scalars at each log step into <run>/tensorboard (the loss & co. come from transformers)."""

    def __init__(self, run_dir):
        self.dir = tensorboard_dir(run_dir)
        self.writer = None

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir), filename_suffix=".aitraining")
        return self.writer

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero:
            return
        w = self._writer()
        for k, v in memory_mb().items():
            w.add_scalar(k, v, state.global_step)
        w.flush()

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        """The --use-enhanced-eval metrics: computed in on_evaluate, after transformers logged the rest."""
        if not state.is_world_process_zero or not metrics:
            return
        w = self._writer()
        for k, v in metrics.items():
            if k.startswith("eval_") and k[5:] in ENHANCED and isinstance(v, (int, float)):
                w.add_scalar(f"eval/{k[5:]}", v, state.global_step)
        w.flush()

    def on_train_end(self, args, state, control, **kw):
        if self.writer is not None:
            self.writer.flush()

    def add_samples(self, samples: list[dict], step: int) -> None:
        """Generation samples as one markdown table (TensorBoard's Text tab)."""
        if not samples:
            return
        lines = ["| prompt | answer | reference | stopped |", "| --- | --- | --- | --- |"]
        for s in samples:
            cells = [str(s.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in
                     ("prompt", "prediction", "reference", "stopped")]
            lines.append("| " + " | ".join(cells) + " |")
        w = self._writer()
        w.add_text("samples", "\n".join(lines), step)
        w.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
