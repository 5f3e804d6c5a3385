"""KTO (--trainer kto): TRL's KTOConfig + KTOTrainer on unpaired records (prompt, completion,
label). --kto-chosen-weight / --kto-rejected-weight weigh desirable / undesirable examples;
--dpo-beta is KTO's beta. Reference: see core.stages.preference.
"""
from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError
from core.params import LLMTrainingParams
from core.stages import preference


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    from trl import KTOConfig, KTOTrainer

    if params.batch_size < 2:  # KTO estimates its KL term from the other answers of the same batch
        raise ConfigError("KTO needs --batch-size 2 or more: it estimates the KL term by pairing each prompt "
                          "with another example's answer from the same batch")
    return preference.build_trainer(params, run_dir, config_class=KTOConfig, trainer_class=KTOTrainer,
                                    kind="kto", reference=True, beta=params.dpo_beta,
                                    desirable_weight=params.kto_chosen_weight,
                                    undesirable_weight=params.kto_rejected_weight)


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    return preference.run(build_trainer(params, run_dir), params, run_dir)
