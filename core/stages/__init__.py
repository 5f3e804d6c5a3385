"""The stage registry: STAGES is the only list of what `--trainer` can run.

A stage is one module in this package with `run(params, run_dir) -> dict` (final metrics).
Every trainer of the schema (core.params.TRAINER_STAGE) has its stage here; a test checks it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable



@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    data_kind: str  # the canonical records it trains on: sft | text | preference | kto
    entry: str  # "module:function", imported only when the stage runs

    def runner(self) -> Callable:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    "sft": Stage("sft", "Supervised fine-tuning", "sft", "core.stages.sft:run"),
    "pt": Stage("pt", "Pre-training", "text", "core.stages.pt:run"),
    "reward": Stage("reward", "Reward modeling", "preference", "core.stages.reward:run"),
    "dpo": Stage("dpo", "DPO (direct preference optimization)", "preference", "core.stages.dpo:run"),
    "orpo": Stage("orpo", "ORPO (odds ratio preference optimization)", "preference", "core.stages.orpo:run"),
    "simpo": Stage("simpo", "SimPO (simple preference optimization)", "preference", "core.stages.simpo:run"),
    "kto": Stage("kto", "KTO (Kahneman-Tversky optimization)", "kto", "core.stages.kto:run"),
    "distillation": Stage("distillation", "Knowledge distillation", "sft", "core.stages.distillation:run"),
    "ppo": Stage("ppo", "PPO (reinforcement learning from a reward)", "sft", "core.stages.ppo:run"),
}
