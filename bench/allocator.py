"""Peak memory and step time of CPU LoRA training with glibc's malloc vs jemalloc, side by side.

    python bench/allocator.py                 # packaged SmolLM2-135M, batch 8 x 256, 3 reps
    python bench/allocator.py --model tiny    # the random tiny Llama (seconds)

Each (allocator, checkpointing) case runs in a fresh process: glibc ("system"), or jemalloc
preloaded with the settings core/launch.py gives CPU runs. One step is a forward and backward of
a LoRA model (r 16, all linear layers, dropout 0.05) with chunked cross-entropy, the way the SFT
stage trains a packed batch. Printed: the peak RSS growth over the loaded model, the median step
time of steps 2..N, and the ratios jemalloc / glibc with medians over the repetitions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(model_id: str, checkpointing: int, batch: int, seq: int, steps: int) -> dict:
    import torch

    from core.model.adapters import apply_finetuning
    from core.model.chunked_ce import chunked_lm_loss
    from core.model.loader import load_model, resolve_model

    torch.manual_seed(0)
    model = load_model(resolve_model(model_id), dtype=torch.float32, attn_implementation="sdpa",
                       gradient_checkpointing=checkpointing)
    model = apply_finetuning(model, finetuning_type="lora", lora_r=16, lora_alpha=32, lora_dropout=0.05,
                             target_modules="all-linear")
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    loaded, times = _kib("VmRSS"), []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
        chunked_lm_loss(out.hidden_states[-1], ids, model.get_output_embeddings()).backward()
        del out
        times.append(time.perf_counter() - start)
    return {"peak_growth_mib": (_kib("VmHWM") - loaded) / 1024, "step_s": statistics.median(times[1:] or times),
            "jemalloc": "libjemalloc" in Path("/proc/self/maps").read_text()}


def spawn(allocator: str, ns, checkpointing: int) -> dict:
    from core.launch import allocator_env

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "AITRAINING_ALLOCATOR": allocator}
    env.pop("LD_PRELOAD", None)
    env = allocator_env(env)
    args = json.dumps([ns.model_id, checkpointing, ns.batch, ns.seq, ns.steps])
    proc = subprocess.run([sys.executable, __file__, "--worker", args], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{allocator} run failed: {proc.stderr.strip().splitlines()[-1:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model id / directory")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.worker:
        print("RESULT " + json.dumps(worker(*json.loads(ns.worker))))
        return 0
    from core.launch import jemalloc_path

    if not jemalloc_path():
        raise SystemExit("libjemalloc2 is not installed (apt-get install libjemalloc2)")
    if ns.model == "tiny":
        import tempfile

        from throughput import build_tiny  # the same random tiny Llama the throughput bench trains

        ns.model_id = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    else:
        ns.model_id = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(ns.model, ns.model)
    print(f"model {ns.model_id}, batch {ns.batch} x {ns.seq} tokens, {ns.steps} steps, {ns.reps} reps")
    print("| checkpointing | allocator | rep | peak growth MiB | step s |\n|---|---|---|---|---|")
    summary = []
    for ckpt in (0, 1):
        ratios_mem, ratios_time = [], []
        for rep in range(ns.reps):
            res = {a: spawn(a, ns, ckpt) for a in ("system", "jemalloc")}
            assert res["jemalloc"]["jemalloc"] and not res["system"]["jemalloc"]
            for a, r in res.items():
                print(f"| {'on' if ckpt else 'off'} | {a} | {rep + 1} | {r['peak_growth_mib']:.0f} | {r['step_s']:.2f} |",
                      flush=True)
            ratios_mem.append(res["jemalloc"]["peak_growth_mib"] / res["system"]["peak_growth_mib"])
            ratios_time.append(res["jemalloc"]["step_s"] / res["system"]["step_s"])
        summary.append(f"checkpointing {'on' if ckpt else 'off'}: jemalloc / glibc peak growth "
                       f"x{statistics.median(ratios_mem):.2f}, step time x{statistics.median(ratios_time):.2f} "
                       f"(medians of {ns.reps})")
    print("\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
