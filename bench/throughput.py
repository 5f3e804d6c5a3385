"""Throughput benchmark: the same LoRA SFT job trained three ways, side by side.

    python bench/throughput.py --model tiny --reps 3 --steps 10
    python bench/throughput.py --model smollm2 --reps 2 --steps 6      # packaged SmolLM2-135M
    python bench/throughput.py --model gemma                           # packaged Gemma 3 270M

(a) ours:     this project's engine (core.stages.sft.build_trainer) with its own choices (fp32 on
              a CPU, SDPA, data tokenized once, chunked cross-entropy when the batch's logits
              are big, gradient checkpointing on only as many layers as the memory budget needs)
              and --packing (full blocks of --seq tokens). With --budget baseline (the default)
              ours is given the baseline's measured peak memory of the same repetition as its
              budget (--max-memory-gb, less what the process holds before the model loads) and
              must choose how to stay under it; --budget none lets it use the free memory;
    ours-bf16: the same with --mixed-precision bf16, run only where the device has native bf16
              (a CPU with AVX512-BF16/AMX, most GPUs);
(b) baseline: transformers Trainer + peft written here with library defaults: tokenize with
              truncation, DataCollatorForLanguageModeling padding to the longest in the batch,
              default TrainingArguments;
(c) trl:      TRL's SFTTrainer with its defaults (SFTConfig), except bf16=False on a CPU, where
              its bf16 default refuses to start.

Same model, data, sequence length, batch, steps, seed and LoRA shape (r 16, alpha 32, dropout
0.05, all linear layers) for all three. Each run is a fresh process (`--worker`), the engines
alternate within each repetition so load on a shared machine hits them alike. Reported per run:
trained tokens/s (non-padding tokens of steps 2..N over their wall time; step 1 warms up), peak
memory (the process's peak RSS on a CPU, torch's peak allocation on a GPU), the padding fraction
of the batches, time to the end of the first step from process start (imports, model load and
data preparation included), and on a GPU the MFU against the device's bf16 peak. Then the
medians and the ratios ours / baseline and ours / trl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {"tiny": None, "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma": "google/gemma-3-270m"}
ENGINES = ("ours", "ours-bf16", "baseline", "trl")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
LR = 2e-4


# ---------------------------------------------------------------------------- setup (parent)

def build_tiny(out: Path) -> Path:
    """A random 2-layer Llama (hidden 64) with the repository's test tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "tests" / "assets" / "tiny-tokenizer")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_data(out: Path, n: int, seed: int) -> Path:
    """n alpaca records drawn from the demo sets (instructions of mixed lengths), as JSONL."""
    import random

    rows = json.loads((REPO / "data" / "demo_instruct.json").read_text(encoding="utf-8"))
    for r in json.loads((REPO / "data" / "identity.json").read_text(encoding="utf-8")):
        r = {k: v.replace("{{name}}", "Ada").replace("{{author}}", "Lab") for k, v in r.items()}
        rows.append(r)
    rng = random.Random(seed)
    picked = [rng.choice(rows) for _ in range(n)]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------- measuring (worker)

class Meter:
    """Counts the tokens of each batch (wrapping the data collator) and times each step."""

    def __init__(self, t0: float):
        self.t0, self.batches, self.step_end = t0, [], []

    def wrap(self, collate):
        def counting(features):
            batch = collate(features)
            mask = batch.get("attention_mask")
            total = batch["input_ids"].numel()
            real = int(mask.sum()) if mask is not None else total
            self.batches.append((total, real))
            return batch
        return counting

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                meter.step_end.append(time.time())
        return StepTimer()

    def result(self, n_params: int, n_trainable: int) -> dict:
        import torch

        steps = len(self.step_end)
        batches = self.batches[:steps]
        real = sum(b[1] for b in batches[1:])
        seconds = self.step_end[-1] - self.step_end[0] if steps > 1 else float("nan")
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_bytes("VmHWM")
        out = dict(steps=steps, tokens_per_s=real / seconds if steps > 1 else float("nan"),
                   peak_mib=peak / 2 ** 20, padding=1 - sum(b[1] for b in batches) / max(1, sum(b[0] for b in batches)),
                   first_step_s=self.step_end[0] - self.t0 if steps else float("nan"),
                   params=n_params, trainable=n_trainable)
        if torch.cuda.is_available():
            from core.model.memory import device_flops

            # forward 2N + backward 2N (activation gradients) + 2 x trainable (weight gradients) per token
            flops = out["tokens_per_s"] * (4 * n_params + 2 * n_trainable)
            out["mfu"] = flops / device_flops("cuda")
        return out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _counts(model) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def _messages(rec: dict) -> list[dict]:
    prompt = rec["instruction"] + (("\n" + rec["input"]) if rec.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]


def _plain(rec: dict) -> str:
    return rec["instruction"] + (("\n" + rec["input"]) if rec.get("input") else "") + "\n" + rec["output"]


def run_ours(cfg: dict, meter: Meter) -> dict:
    from core.params import LLMTrainingParams
    from core.stages import sft

    budget = _budget_gb(cfg)  # before the model loads
    params = LLMTrainingParams(
        model=cfg["model"], data_path=cfg["data"], project_name=cfg["out"], trainer="sft", peft=True,
        lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        target_modules=LORA["target_modules"], batch_size=cfg["batch"], gradient_accumulation=1,
        max_steps=cfg["steps"], lr=LR, seed=cfg["seed"], block_size=cfg["seq"], packing=True, log="none",
        mixed_precision=cfg.get("mixed_precision"), max_memory_gb=budget,
        save_strategy="no", eval_strategy="no", logging_steps=1000, merge_adapter=False,
        chat_template=None if cfg["chat"] else "none")
    trainer, *_ = sft.build_trainer(params, Path(cfg["out"]))
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.add_callback(meter.callback())
    trainer.train()
    res = meter.result(*_counts(trainer.model))
    res["packed"] = all(n == cfg["seq"] for n in lengths)
    res["chunked_ce"] = bool(getattr(trainer, "chunked_ce", False))
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    res["checkpointed"] = f"{sum(bool(m.gradient_checkpointing) for m in layers)}/{len(layers)}"
    res["budget_gib"] = budget
    return res


def _budget_gb(cfg: dict):
    """The run's memory budget in GiB: the baseline's peak RSS less this process's RSS now (Python
    and the libraries, before any model loads), or None without a budget."""
    if not cfg.get("budget_bytes"):
        return None
    return max(0.1, (cfg["budget_bytes"] - _status_bytes("VmRSS")) / 2 ** 30)


def run_baseline(cfg: dict, meter: Meter) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments, set_seed)

    set_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["path"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in Path(cfg["data"]).read_text(encoding="utf-8").splitlines() if line]
    texts = [tok.apply_chat_template(_messages(r), tokenize=False) if cfg["chat"] else _plain(r) for r in rows]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=cfg["seq"]), batched=True, remove_columns=["text"])
    model = AutoModelForCausalLM.from_pretrained(cfg["path"])
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(output_dir=cfg["out"], per_device_train_batch_size=cfg["batch"],
                             max_steps=cfg["steps"], learning_rate=LR, seed=cfg["seed"], report_to=[],
                             save_strategy="no", logging_steps=1000)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=meter.wrap(DataCollatorForLanguageModeling(tok, mlm=False)))
    trainer.add_callback(meter.callback())
    trainer.train()
    return meter.result(*_counts(trainer.model))


def run_trl(cfg: dict, meter: Meter) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(cfg["data"]).read_text(encoding="utf-8").splitlines() if line]
    ds = Dataset.from_list([{"messages": _messages(r)} for r in rows] if cfg["chat"]
                           else [{"text": _plain(r)} for r in rows])
    extra = {} if torch.cuda.is_available() else {"bf16": False}  # its bf16 default refuses a CPU
    args = SFTConfig(output_dir=cfg["out"], per_device_train_batch_size=cfg["batch"], max_steps=cfg["steps"],
                     learning_rate=LR, seed=cfg["seed"], report_to=[], save_strategy="no", logging_steps=1000,
                     max_length=cfg["seq"], **extra)
    tok = AutoTokenizer.from_pretrained(cfg["path"])
    trainer = SFTTrainer(model=cfg["path"], args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.add_callback(meter.callback())
    trainer.train()
    return meter.result(*_counts(trainer.model))


def worker(engine: str, cfg: dict) -> None:
    meter = Meter(float(os.environ.get("BENCH_T0") or time.time()))
    if engine == "ours-bf16":  # the same engine, weights in bf16 with autocast (--mixed-precision bf16)
        engine, cfg = "ours", {**cfg, "mixed_precision": "bf16"}
    res = {"ours": run_ours, "baseline": run_baseline, "trl": run_trl}[engine](cfg, meter)
    print("BENCH_RESULT " + json.dumps(res))


# ---------------------------------------------------------------------------- driving (parent)

def spawn(engine: str, cfg: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_T0": repr(time.time()), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}
    if engine.startswith("ours"):  # the environment our launcher gives a CPU run (jemalloc)
        from core.launch import allocator_env

        env = allocator_env(env) if not _cuda() else env
    cfg = {**cfg, "out": tempfile.mkdtemp(prefix=f"bench-{engine}-")}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", engine,
                               "--cfg", json.dumps(cfg)], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def _choices(res: dict) -> str:
    if "checkpointed" not in res:
        return ""
    budget = f"budget {res['budget_gib']:.2f} GiB, " if res.get("budget_gib") else ""
    return (f" [{budget}chunked CE {'on' if res.get('chunked_ce') else 'off'}, "
            f"checkpointed layers {res['checkpointed']}]")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def native_bf16() -> bool:
    """bf16 matmuls in hardware: a CUDA GPU that supports them, or a CPU with AVX512-BF16 / AMX."""
    import torch

    from core.model.loader import cpu_has_native_bf16

    return torch.cuda.is_bf16_supported() if _cuda() else cpu_has_native_bf16()


def median(values):
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def table(results: dict[str, list[dict]]) -> str:
    cols = ("tokens/s", "peak MiB", "padding", "1st step s")
    keys = ("tokens_per_s", "peak_mib", "padding", "first_step_s")
    gpu = any("mfu" in r for rs in results.values() for r in rs)
    head = "| engine | run | " + " | ".join(cols) + (" | MFU" if gpu else "") + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for engine, runs in results.items():
        for i, r in enumerate(runs + [None]):
            if r is None:
                vals = {k: median([x.get(k, float("nan")) for x in runs if "error" not in x]) for k in keys + ("mfu",)}
                label = "**median**"
            elif "error" in r:
                lines.append(f"| {engine} | {i + 1} | error: {r['error']} |")
                continue
            else:
                vals, label = r, str(i + 1)
            cells = [f"{vals['tokens_per_s']:.1f}", f"{vals['peak_mib']:.0f}", f"{vals['padding']:.1%}",
                     f"{vals['first_step_s']:.1f}"] + ([f"{vals.get('mfu', float('nan')):.1%}"] if gpu else [])
            lines.append(f"| {engine} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: dict[str, list[dict]]) -> str:
    out = []
    for mine, other in (("ours", "baseline"), ("ours", "trl"), ("ours-bf16", "baseline"), ("ours-bf16", "trl")):
        ours, runs = results.get(mine, []), results.get(other, [])
        pairs = [(a, b) for a, b in zip(ours, runs) if "error" not in a and "error" not in b]
        if not pairs:
            continue
        tps = median([a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs])
        mem = median([a["peak_mib"] / b["peak_mib"] for a, b in pairs])
        ttfs = median([a["first_step_s"] / b["first_step_s"] for a, b in pairs])
        out.append(f"{mine} / {other}: trained tokens/s x{tps:.2f}, peak memory x{mem:.2f}, time to first "
                   f"step x{ttfs:.2f} (medians of {len(pairs)} paired runs)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="tiny")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="max sequence length (and the packing block)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of ours,baseline,trl")
    ap.add_argument("--budget", choices=("baseline", "none"), default="baseline",
                    help="ours's memory budget: the baseline's peak of the same repetition, or none")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.worker:
        worker(ns.worker, json.loads(ns.cfg))
        return 0

    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    if ns.model == "tiny":
        path, model_id = build_tiny(work / "tiny"), str(work / "tiny")
    else:
        from core.model.loader import resolve_model

        model_id = MODELS[ns.model]
        path = resolve_model(model_id)  # converts a packaged model once, before anything is timed
    from transformers import AutoTokenizer

    chat = bool(AutoTokenizer.from_pretrained(path).chat_template)
    data = write_data(work / "data.jsonl", n=max(64, ns.steps * ns.batch * 2), seed=ns.seed)
    cfg = dict(model=model_id, path=str(path), data=str(data), batch=ns.batch, seq=ns.seq, steps=ns.steps,
               seed=ns.seed, chat=chat)
    engines = [e.strip() for e in ns.engines.split(",") if e.strip()]
    if "ours-bf16" in engines and not native_bf16():
        print("ours-bf16 skipped: this device has no native bf16 (it would be emulated, slower than fp32)")
        engines.remove("ours-bf16")
    results: dict[str, list[dict]] = {e: [] for e in engines}
    if ns.budget == "baseline" and "baseline" in engines:
        engines.remove("baseline")
        engines.insert(0, "baseline")  # first, so ours can be given its peak as the budget
    for rep in range(ns.reps):
        budget = None
        for engine in engines:
            start = time.time()
            res = spawn(engine, {**cfg, "budget_bytes": budget} if engine.startswith("ours") else cfg, ns.timeout)
            if engine == "baseline" and ns.budget == "baseline" and "error" not in res:
                budget = res["peak_mib"] * 2 ** 20
            results[engine].append(res)
            print(f"rep {rep + 1} {engine}: " + (res.get("error") or
                  f"{res['tokens_per_s']:.1f} tokens/s, peak {res['peak_mib']:.0f} MiB, padding "
                  f"{res['padding']:.1%}, first step {res['first_step_s']:.1f} s"
                  + (", packed" if res.get("packed") else "") + _choices(res)) + f" ({time.time() - start:.0f} s)",
                  flush=True)
            if ns.json:  # after every run, so a long benchmark stopped early keeps what it measured
                Path(ns.json).write_text(json.dumps({"config": cfg, "results": results}, indent=1))
    import peft
    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"\nmodel {ns.model} ({model_id}), batch {ns.batch}, max length {ns.seq}, {ns.steps} steps, "
          f"{ns.reps} reps, seed {ns.seed}, LoRA r{LORA['r']}/alpha {LORA['lora_alpha']} all-linear, "
          f"chat template {'yes' if chat else 'no (plain text)'}")
    print(f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"trl {trl.__version__}")
    ours = results.get("ours") or []
    if ours and "error" not in ours[0]:
        print("ours packs its batches: " + ("yes" if ours[0].get("packed") else "no"))
    print()
    print(table(results))
    print()
    print(ratios(results))
    if ns.json:
        Path(ns.json).write_text(json.dumps({"config": cfg, "results": results}, indent=1))
    return 0 if all("error" not in r for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
