"""`core.run` under a distributed launcher, with each rank recording what it did.

    <launcher args> tests/dist_probe.py <config.yaml>

Runs the real `core.run.main` (data, trainer, launcher, saving: nothing replaced). Two spies only
watch: Trainer.compute_loss notes the samples of every batch this rank trained on, Trainer.train
notes the rank's log history and the trainable weights it holds when training ends (gathered
from the shards under ZeRO-3 and FSDP). Each rank writes <run>/probe-rank<N>.pt for the tests to compare.
"""
import os
import sys
from pathlib import Path

import torch
import transformers

from core import config_io
from core.run import main

seen: dict = {"batches": []}
real_loss, real_train = transformers.Trainer.compute_loss, transformers.Trainer.train


def compute_loss(self, model, inputs, *a, **kw):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    seen["batches"].append([tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)])
    return real_loss(self, model, inputs, *a, **kw)


def held_weights(trainer) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone().float() for n, p in named}
    # FSDP2 holds DTensor shards: full_tensor() gathers them (every rank takes part)
    return {n.replace("_fsdp_wrapped_module.", ""): (p.full_tensor() if hasattr(p, "full_tensor") else p)
            .detach().clone().float() for n, p in named}


def train(self, *a, **kw):
    result = real_train(self, *a, **kw)
    seen["log_history"] = [dict(r) for r in self.state.log_history]
    seen["weights"] = held_weights(self)
    seen["world_size"] = self.accelerator.num_processes
    return result


transformers.Trainer.compute_loss, transformers.Trainer.train = compute_loss, train

if __name__ == "__main__":
    code = main(sys.argv[1:])
    run_dir = Path(config_io.load(sys.argv[1]).project_name)
    torch.save(seen, run_dir / f"probe-rank{os.environ.get('RANK', '0')}.pt")
    sys.exit(code)
