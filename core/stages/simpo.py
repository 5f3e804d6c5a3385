"""SimPO (--trainer simpo): TRL's experimental CPOConfig + CPOTrainer with loss_type="simpo".

Reference-free: the reward is --dpo-beta times the length-normalised log-probability, and the
chosen answer must win by --simpo-gamma. cpo_alpha (CPO's NLL term on the chosen answers) is
--pref-ftx, 0 by default: plain SimPO.
"""
from __future__ import annotations

from pathlib import Path

from core.params import LLMTrainingParams
from core.stages import preference


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return preference.build_trainer(params, run_dir, config_class=CPOConfig, trainer_class=CPOTrainer,
                                    kind="preference", reference=False, loss_type="simpo",
                                    beta=params.dpo_beta, simpo_gamma=params.simpo_gamma,
                                    cpo_alpha=params.pref_ftx, label_smoothing=params.dpo_label_smoothing)


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    return preference.run(build_trainer(params, run_dir), params, run_dir)
