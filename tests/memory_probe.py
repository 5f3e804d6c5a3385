"""Measure the peak memory of a real training run next to its estimate (run in a fresh process).

    python tests/memory_probe.py MODEL METHOD BATCH SEQ OUT_DIR [PRECISION]  -> prints one JSON line

Every record is long enough to be cut at SEQ tokens, so each batch is BATCH x SEQ tokens as the
estimate assumes. The process imports everything and reads the data first, then resets the
kernel's peak-RSS counter (/proc/self/clear_refs) and records the resident set; the peak after
two optimizer steps minus that is what the model, its training state and its activations took.
"""
import json
import sys
from pathlib import Path


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    model, method, batch, seq, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    precision = sys.argv[6] if len(sys.argv) > 6 else None
    import torch  # noqa: F401  (everything imported before the baseline)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from core.model.memory import estimate
    from core.params import LLMTrainingParams
    from core.stages import common, sft

    out.mkdir(parents=True, exist_ok=True)
    words = " ".join(f"word{i} and more text number {i}" for i in range(seq * 2))
    data = out / "long.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {k}.", "input": "", "output": words})
                              for k in range(batch * 2)) + "\n")
    params = LLMTrainingParams(
        model=model, data_path=str(data), project_name=str(out / "run"), finetuning_type=method,
        batch_size=batch, gradient_accumulation=1, block_size=seq, max_steps=2, log="none",
        save_strategy="no", eval_strategy="no", lr=1e-4, chat_template="none" if method else None,
        merge_adapter=False, mixed_precision=precision)
    common.load_tokenizer_and_template(params)  # warm: tokenizer files and imports
    common.load_records(params, kind="sft")
    import gc
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = rss("VmRSS")
    trainer, *_ = sft.build_trainer(params, out / "run")
    trainer.train()
    peak = rss("VmHWM") - base
    est = estimate(params, seq_len=seq, available=None)
    print(json.dumps({"measured": peak, "estimate": est.total, "weights": est.weights,
                      "activations": est.activations, "gradients": est.gradients,
                      "optimizer": est.optimizer, "overhead": est.overhead}))


if __name__ == "__main__":
    main()
