"""ORPO (--trainer orpo): TRL's experimental ORPOConfig + ORPOTrainer. No reference model: the
loss is the chosen answers' NLL plus --dpo-beta (the paper's lambda) times the log odds ratio."""
from __future__ import annotations

from pathlib import Path

from core.params import LLMTrainingParams
from core.stages import preference


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return preference.build_trainer(params, run_dir, config_class=ORPOConfig, trainer_class=ORPOTrainer,
                                    kind="preference", reference=False, beta=params.dpo_beta)


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    return preference.run(build_trainer(params, run_dir), params, run_dir)
