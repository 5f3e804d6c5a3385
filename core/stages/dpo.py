"""DPO (--trainer dpo): TRL's DPOConfig + DPOTrainer.

--pref-loss picks the loss (sigmoid, hinge, ipo); --dpo-label-smoothing > 0 with sigmoid is
robust DPO (TRL's "robust" loss: noisy-label corrected sigmoid); --pref-ftx > 0 adds TRL's "sft"
loss on the chosen answers with that weight. Reference: see core.stages.preference.
"""
from __future__ import annotations

import logging
from pathlib import Path

from core.errors import ConfigError
from core.params import LLMTrainingParams
from core.stages import preference

log = logging.getLogger("aitraining")


def loss_settings(params: LLMTrainingParams) -> dict:
    """DPOConfig's loss_type / loss_weights / label_smoothing from our flags."""
    loss, smoothing = params.pref_loss, params.dpo_label_smoothing
    if smoothing and loss == "sigmoid":
        if smoothing >= 0.5:  # robust DPO divides by 1 - 2*eps
            raise ConfigError("--dpo-label-smoothing must be below 0.5 for the sigmoid loss (robust DPO); "
                              "e.g. 0.1")
        loss = "robust"
    elif smoothing:
        log.warning("--dpo-label-smoothing applies to the sigmoid loss only; ignored with --pref-loss %s", loss)
        smoothing = 0.0
    types, weights = [loss], [1.0]
    if params.pref_ftx > 0:
        types.append("sft")
        weights.append(params.pref_ftx)
    return {"loss_type": types, "loss_weights": weights, "label_smoothing": smoothing}


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    from trl import DPOConfig, DPOTrainer

    return preference.build_trainer(params, run_dir, config_class=DPOConfig, trainer_class=DPOTrainer,
                                    kind="preference", reference=True, beta=params.dpo_beta,
                                    **loss_settings(params))


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    return preference.run(build_trainer(params, run_dir), params, run_dir)
