"""Will this run fit, and how long will a step take? An estimate made before any weight loads.

    from core.model.memory import estimate
    est = estimate(params)            # from the model's config.json and this machine
    print(est.summary())              # "peak ~1.9 GiB of 21.3 GiB available (weights 0.5, ...)"

Peak memory of one training step is the sum of
- weights: every parameter in the load dtype (int4/int8 linear weights for QLoRA);
- gradients and optimizer states: only for trainable parameters (LoRA: the adapters), fp32
  for adapters (peft keeps them in fp32), the load dtype otherwise; AdamW keeps two states;
- activations kept for the backward pass: per token and decoder layer, a number of hidden-size
  and intermediate-size vectors (counted from what the Llama-style layer saves: norms, q/k/v,
  RoPE copies, attention output, the gated MLP; LoRA dropout adds copies of each adapted
  input), plus the logits, their log-softmax and their gradients (vocabulary-sized, fp32), or
  one chunk of them with chunked cross-entropy; a checkpointed layer keeps only its input, and
  one layer's activations live while it is recomputed. On a CPU checkpointing covers only as
  many layers as the budget needs (checkpoint_layers); under bf16/fp16 autocast some vectors
  stay fp32 (RMSNorm computes in fp32; peft's adapters are fp32);
- a small fixed overhead of the training loop (allocator slack, optimizer bookkeeping).

The parameter counts are exact: the model is built on PyTorch's meta device (no memory) and the
chosen method (full / freeze / LoRA) is applied to it with the same code the run uses.
Time per step is FLOPs / (device FLOP/s x efficiency): ~6 x params x tokens for full training,
~4 x params x tokens when the base is frozen (no weight gradients), plus attention. The device's
FLOP/s is measured with a short fp32 matmul on a CPU, and taken from a table on a GPU.

Tests check the estimate against the measured peak (tests/test_memory.py).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger("aitraining")

GIB = 1024 ** 3
MAX_MEMORY_ENV = "AITRAINING_MAX_MEMORY_GB"  # a memory budget for the check (tests, shared hosts)

# Activation vectors saved per token per decoder layer (fp32 words), counted for a Llama-style
# layer in eager PyTorch with SDPA attention:
#   hidden-size vectors: input norm (input, normalised, scaled: 3), q and its RoPE copies (3),
#   k/v and k's RoPE copies (scaled by kv heads, see below), attention output (1), o_proj
#   input/out (2), post-attention norm (3), residuals (2)  -> ~14
#   intermediate-size vectors: gate, up, act(gate), act(gate)*up (4)
#   LoRA with dropout: each adapted Linear keeps a dropped-out copy of its input and a mask.
ACT_HIDDEN = 14.0
ACT_INTER = 4.0
# Under bf16/fp16 the layer keeps about this many hidden-size vectors per token in fp32 on top
# (RMSNorm upcasts its input, the normalised copy; RoPE's products): measured, SmolLM2 LoRA bf16.
ACT_UPCAST_HIDDEN = 5.0
# Vocabulary-sized fp32 tensors alive at the peak (at the start of the backward pass): the
# logits, their log-softmax, and the gradient of each.
ACT_VOCAB = 4.0
# Bytes the training loop itself adds on a CPU once the model is loaded (optimizer bookkeeping,
# allocator slack, data loader, trainer state), measured on this project's runs.
CPU_OVERHEAD = 64 * 1024 ** 2
# What a CUDA context and the caching allocator take besides tensors.
CUDA_OVERHEAD = 600 * 1024 ** 2
# Fraction of the device's matmul FLOP/s that a training step reaches (small matrices,
# elementwise work, the optimizer); rough, so the time is a guide, not a promise.
EFFICIENCY = {"cpu": 0.45, "cuda": 0.35}
# Dense bf16 peak FLOP/s of common GPUs (vendor figures, no sparsity), for MFU and step time.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                  "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


@dataclass
class Estimate:
    """Peak memory (bytes) of a training run and the time of one optimizer step (seconds)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    available: Optional[float]      # bytes the run may use (free memory, or the budget given)
    device: str                     # "cpu" or "cuda"
    batch_size: int
    seq_len: int
    gradient_accumulation: int
    total_params: int
    trainable_params: int
    checkpointing: bool
    checkpointed_layers: int        # of `layers` (all of them when checkpointing is simply on)
    layers: int
    step_seconds: float             # one optimizer step (gradient_accumulation micro-batches)
    flops_per_step: float
    device_flops: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def summary(self) -> str:
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        avail = f" of {g(self.available)} GiB available" if self.available is not None else ""
        part = f" on {self.checkpointed_layers} of {self.layers} layers" if 0 < self.checkpointed_layers < self.layers else ""
        ckpt = f", gradient checkpointing{part}" if self.checkpointing else ""
        return (f"memory estimate: peak ~{g(self.total)} GiB{avail} on {self.device} (weights {g(self.weights)}, "
                f"gradients {g(self.gradients)}, optimizer {g(self.optimizer)}, activations "
                f"{g(self.activations)}, overhead {g(self.overhead)}; batch {self.batch_size} x "
                f"{self.seq_len} tokens{ckpt}); time ~{fmt_s(self.step_seconds)} per optimizer step "
                f"({self.trainable_params:,} of {self.total_params:,} parameters trainable)")


def fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


# ---------------------------------------------------------------------------- the device

def parse_memory(text) -> Optional[float]:
    """'8', '8GB', '8 GiB', '512MB' -> bytes (GiB when no unit); None/'' -> None."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        from core.errors import ConfigError

        raise ConfigError(f"memory budget '{text}' is not a size; write it like 8 (GiB), 8GB or 512MB")
    unit = (m.group(2) or "g")[:1]
    return float(m.group(1)) * {"k": 1024, "m": 1024 ** 2, "g": GIB, "t": 1024 ** 4, "b": 1}[unit]


def available_memory(device: str, budget_gb: Optional[float] = None) -> Optional[float]:
    """Bytes a run may use: the budget given (--max-memory-gb or AITRAINING_MAX_MEMORY_GB), else the
    free GPU memory, else the available RAM (MemAvailable)."""
    if budget_gb:
        return float(budget_gb) * GIB
    env = parse_memory(os.environ.get(MAX_MEMORY_ENV))
    if env:
        return env
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return float(free)
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            pass
    return None


@functools.lru_cache(maxsize=None)
def device_flops(device: str) -> float:
    """Matmul FLOP/s of the device: a table for GPUs (bf16 dense peak), a 0.1 s fp32 measurement on CPU."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 100e12
    n = 1024
    # a private generator: the run's global RNG (weight init, LoRA init, data order) stays untouched
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- the model

def config_if_local(model_id: str, trust_remote_code: bool = False):
    """The model's AutoConfig when it is on this machine already (local directory, HF cache,
    converted packaged copy); None when reading it would need a download or a conversion."""
    from transformers import AutoConfig

    from core.model import loader, packaged

    path = Path(str(model_id)).expanduser()
    if not (path / "config.json").is_file():
        path = None
        entry = packaged.get(str(model_id))
        if entry is not None and (packaged.cache_dir(entry.model_id) / "config.json").is_file():
            path = packaged.cache_dir(entry.model_id)
        if path is None:
            path = loader._from_hf_cache(entry.model_id if entry else str(model_id))
    if path is None or not (Path(path) / "config.json").is_file():
        return None
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def _meta_model(params, config):
    """The model with the run's method applied, built on the meta device (no memory, exact counts)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from core.model.adapters import apply_finetuning

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=params.trust_remote_code)
    quiet = logging.getLogger("aitraining")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # apply_finetuning logs its counts; the run logs them once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft asks a transformers 5 model an old name
            return apply_finetuning(
                model, finetuning_type=params.finetuning_type, lora_r=params.lora_r,
                lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                target_modules=params.target_modules, freeze_trainable_layers=params.freeze_trainable_layers,
                freeze_trainable_modules=params.freeze_trainable_modules,
                freeze_extra_modules=params.freeze_extra_modules)
    finally:
        quiet.setLevel(level)


@dataclass
class _Shape:
    total: int
    trainable: int
    quantizable: int     # weights of the Linear layers inside the decoder (what QLoRA quantizes)
    adapted_inputs: int  # summed input widths of the LoRA-adapted Linears in one layer
    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    kv_ratio: float


_SHAPES: dict = {}


def _shape_cached(params, config) -> "_Shape":
    """_shape, remembered per (config, method): the web UI asks again on every change."""
    import json

    key = (json.dumps(config.to_dict(), sort_keys=True, default=str),
           params.model_dump_json(include=_SHAPE_FIELDS))
    if key not in _SHAPES:
        _SHAPES[key] = _shape(params, config)
    return _SHAPES[key]


def _shape(params, config) -> _Shape:
    import torch.nn as nn

    model = _meta_model(params, config)
    total = trainable = quantizable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    adapted = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in f".{name}" and "lora_" not in name:
            quantizable += m.weight.numel()
            if (".layers.0." in f".{name}") and hasattr(_parent(model, name), "lora_A"):
                adapted += m.in_features
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv = int(getattr(text, "num_key_value_heads", heads) or heads)
    return _Shape(total=total, trainable=trainable, quantizable=quantizable, adapted_inputs=adapted,
                  hidden=hidden, inter=int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden),
                  layers=int(getattr(text, "num_hidden_layers", 1) or 1),
                  vocab=vocab_size(config), heads=heads, kv_ratio=kv / heads)


def _parent(model, name: str):
    """The peft LoRA wrapper of a base Linear named '...q_proj.base_layer' (or None)."""
    if not name.endswith(".base_layer"):
        return None
    return model.get_submodule(name.rsplit(".", 1)[0])


# ---------------------------------------------------------------------------- the estimate

CHARS_PER_TOKEN = 3.0  # conservative (English BPE averages ~4): over-estimates the length a little


def data_seq_len(params, config, records) -> int:
    """The longest batch the data will make: the longest record's text in tokens (estimated from
    its characters, plus the chat template's markup), capped by the cutoff. With packing every
    block is full, so it is the block size."""
    import json

    cutoff = seq_len_for(params, config)
    if params.packing or not records:
        return cutoff
    longest = max(len(json.dumps(r, ensure_ascii=False)) for r in records)
    return max(1, min(cutoff, math.ceil(longest / CHARS_PER_TOKEN) + 32))


def seq_len_for(params, config) -> int:
    """The sequence length a batch will have at most: --block-size, else the model's context
    capped by --model-max-length (as the stages compute it)."""
    if params.block_size > 0:
        return params.block_size
    text = getattr(config, "text_config", None) or config
    ctx = getattr(text, "max_position_embeddings", None) or params.model_max_length
    return min(params.model_max_length, ctx)


def estimate(params, **kw) -> Optional[Estimate]:
    """The estimate (see _estimate), leaving the global RNG as it was: it runs inside training
    processes before the model is built, where a consumed random number would change the weight
    and LoRA initialisation (and make runs differ by whether an estimate was made)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return _estimate(params, **kw)


def _estimate(params, *, config=None, device: Optional[str] = None, seq_len: Optional[int] = None,
              batch_size: Optional[int] = None, checkpointing=None,
              available: Optional[float] = -1.0) -> Optional[Estimate]:
    """The estimate for these parameters, or None when the model's config is not on this machine.

    seq_len defaults to the longest a batch can be (a safe upper bound); batch_size and
    checkpointing default to the run's (True: every layer, an int k: the first k layers, as
    checkpoint_layers returns); available=-1 means: ask the device."""
    import torch

    from core.model.loader import pick_dtype, training_device

    if config is None:
        config = config_if_local(params.model, params.trust_remote_code)
        if config is None:
            return None
    device = device or training_device()
    shape = _shape_cached(params, config)
    b = int(batch_size or params.batch_size)
    s = int(seq_len or seq_len_for(params, config))
    ckpt = default_checkpointing(params, device) if checkpointing is None else checkpointing
    dtype = pick_dtype(params.mixed_precision, device)
    wb = torch.tensor([], dtype=dtype).element_size()
    lora = params.finetuning_type == "lora"

    # weights: QLoRA keeps decoder Linear weights in 4 bits (+ ~0.5 bit of NF4 scales) or 8 bits
    if params.quantization:
        qbytes = 0.5 + 0.0625 if params.quantization == "int4" else 1.0 + 0.03
        weights = shape.quantizable * qbytes + (shape.total - shape.quantizable) * wb
    else:
        weights = shape.total * wb
    grad_bytes = 4 if lora else wb  # peft keeps adapters in fp32
    gradients = shape.trainable * grad_bytes
    optimizer = shape.trainable * grad_bytes * _optimizer_states(params.optimizer)

    # a frozen copy for the KL / reference term (with LoRA the base itself, adapters off, serves)
    stage = getattr(params, "stage", "sft")
    if stage in ("dpo", "kto", "ppo") and not lora:
        weights *= 2
    # activations for one micro-batch of b x s tokens; preference stages run chosen and rejected
    tokens = b * s * (2 if stage in ("dpo", "orpo", "simpo", "kto", "reward") else 1)
    h, i, L = shape.hidden, shape.inter, shape.layers
    per_layer = ACT_HIDDEN * h + 4 * h * shape.kv_ratio + ACT_INTER * i
    if lora and (params.lora_dropout > 0 or wb < 4):
        # peft runs the adapters in fp32: each adapted input is kept as an fp32 (dropped-out)
        # copy, plus the dropout's bool mask
        per_layer += shape.adapted_inputs * ((4 + (params.lora_dropout > 0)) / wb)
    if wb < 4:
        per_layer += ACT_UPCAST_HIDDEN * h * 4 / wb
    if (params.attn_implementation or "sdpa") == "eager":
        per_layer += 2 * shape.heads * s  # attention probabilities (and their dropout input)
    k = L if ckpt is True else min(L, int(ckpt or 0))  # checkpointed layers keep their input only; one
    layer_acts = tokens * wb * (k * h + (L - k) * per_layer + (per_layer if k else 0))  # is recomputed
    if chunked_ce_on(params, config, b * s) and stage in ("sft", "pt"):
        # one chunk's fp32 logits (turned into the softmax in place) and the matmul's output,
        # plus the hidden-state gradient made in the forward pass
        vocab_acts = 2 * chunk_size(shape.vocab) * shape.vocab * 4 + tokens * h * wb
    else:
        vocab_acts = tokens * shape.vocab * 4 * ACT_VOCAB  # the loss upcasts logits to fp32
    activations = layer_acts + vocab_acts
    overhead = CUDA_OVERHEAD if device == "cuda" else CPU_OVERHEAD

    # time: forward 2*N*T; backward 2*N*T for activation gradients + 2*N_trainable*T for weight
    # gradients (a frozen base needs no weight gradients); attention ~ 4*s*h per token per layer,
    # times 3 for forward+backward; checkpointing adds one more forward.
    fwd = 2 * shape.total * tokens + 4 * tokens * s * h * L / 2
    flops = fwd * (2 + k / L) + 2 * shape.trainable * tokens
    flops *= params.gradient_accumulation
    dev_flops = device_flops(device)
    # fp16/bf16 on a GPU run at the table's peak; fp32 there at about half of it (TF32)
    eff = EFFICIENCY.get(device, 0.4) * (0.5 if device == "cuda" and wb == 4 else 1.0)
    step_s = flops / (dev_flops * eff)

    if available is not None and available < 0:
        available = available_memory(device, getattr(params, "max_memory_gb", None))
    notes = []
    if params.quantization and device == "cpu":
        notes.append("bitsandbytes on a CPU dequantizes per layer; its time is far above the estimate")
    return Estimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                    overhead=overhead, available=available, device=device, batch_size=b, seq_len=s,
                    gradient_accumulation=params.gradient_accumulation, total_params=shape.total,
                    trainable_params=shape.trainable, checkpointing=bool(k), checkpointed_layers=k,
                    layers=L, step_seconds=step_s,
                    flops_per_step=flops, device_flops=dev_flops, notes=notes)


_SHAPE_FIELDS = {"model", "finetuning_type", "peft", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                 "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
                 "trust_remote_code"}


def _optimizer_states(name: str) -> float:
    """Optimizer state per trainable parameter, in units of the parameter's size."""
    n = (name or "").lower()
    if "8bit" in n:
        return 0.5
    if n.startswith("sgd"):
        return 0.0
    if "adafactor" in n:
        return 0.1
    if "lion" in n:
        return 1.0
    return 2.0  # the AdamW family: exp_avg and exp_avg_sq


def default_checkpointing(params, device: str) -> bool:
    """What the run does unless memory says otherwise: on for accelerators, off on a CPU
    (recomputing activations costs a third more compute and CPU RAM is rarely the limit)."""
    return not params.disable_gradient_checkpointing and device == "cuda"


def checkpoint_layers(params, device: str, config=None, seq_len: Optional[int] = None):
    """How many decoder layers to checkpoint: True (all), or a count (0: none).

    On an accelerator: all unless disabled. On a CPU, where recomputing costs a third to a half
    more compute and memory is usually ample: none when the run fits without it, else the fewest
    layers that make it fit the budget with the margin (all when nothing fits)."""
    if params.disable_gradient_checkpointing or device == "cuda":
        return default_checkpointing(params, device)
    if config is None:
        config = config_if_local(params.model, params.trust_remote_code)
    est = estimate(params, config=config, device=device, checkpointing=0, seq_len=seq_len)
    if est is None or est.available is None or est.total <= est.available * MARGIN:
        return 0
    for k in range(1, est.layers):
        e = estimate(params, config=config, device=device, checkpointing=k, seq_len=seq_len,
                     available=est.available)
        if e.total <= est.available * MARGIN:
            return k
    return True


def chunked_ce_on(params, config, tokens: int) -> bool:
    """--chunked-ce, or unset: on for a big vocabulary or when a micro-batch of `tokens` tokens
    would make big logits (core/model/chunked_ce.py's rule)."""
    if params.chunked_ce is not None:
        return bool(params.chunked_ce)
    from core.model.chunked_ce import wanted

    return wanted(vocab_size(config), tokens)


def chunk_size(vocab: int) -> int:
    from core.model.chunked_ce import chunk_size as size

    return size(vocab)


def vocab_size(config) -> int:
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 0) or 0)


# ---------------------------------------------------------------------------- fitting the batch

MARGIN = 0.9  # keep 10% of the memory free: the estimate is within ~30%, not exact


def find_batch_size(params, *, config=None, device: Optional[str] = None, seq_len: Optional[int] = None,
                    n_train: Optional[int] = None,
                    available: Optional[float] = -1.0) -> tuple[int, int, Optional[Estimate]]:
    """The largest batch that fits, keeping the effective batch (batch x accumulation) when it can:
    (batch_size, gradient_accumulation, estimate at that batch). Tries 1, 2, 4, ... up to
    batch x accumulation (and no more than the training examples); 1 when nothing fits."""
    effective = params.batch_size * params.gradient_accumulation
    cap = max(1, min(effective, n_train or effective))
    sizes = sorted({2 ** k for k in range(cap.bit_length()) if 2 ** k <= cap} | {cap})
    best = None
    for b in sizes:
        est = estimate(params, config=config, device=device, seq_len=seq_len, batch_size=b,
                       available=available)
        if est is None:
            return params.batch_size, params.gradient_accumulation, None
        if est.available is not None and est.total > est.available * MARGIN:
            break
        best = (b, est)
    if best is None:
        return 1, effective, estimate(params, config=config, device=device, seq_len=seq_len, batch_size=1,
                                      available=available)
    b, est = best
    return b, max(1, math.ceil(effective / b)), est


def with_batch(params, batch_size: int, gradient_accumulation: int):
    """A copy of params with a new batch size and accumulation (the schema re-validated)."""
    data = params.model_dump()
    data.update(batch_size=batch_size, gradient_accumulation=gradient_accumulation)
    return type(params).model_validate(data)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x < 10 * GIB else f"{x / GIB:.1f} GiB"


def refusal(params, est: Estimate, config=None) -> str:
    """The message for a run that will not fit, with the changes that would make it fit (each
    with its own estimate), or the one that comes closest."""
    budget = est.available * MARGIN
    ga = params.gradient_accumulation
    on_gpu = est.device == "cuda"
    ckpt_how = ("drop --disable-gradient-checkpointing" if on_gpu or params.disable_gradient_checkpointing
                else "turned on by itself when it makes the run fit")
    candidates = []  # (text, estimate)
    for ckpt in ([est.checkpointing] if est.checkpointing else [False, True]):
        for b in range(est.batch_size - 1, 0, -1):
            e = estimate(params, config=config, device=est.device, batch_size=b, seq_len=est.seq_len,
                         checkpointing=ckpt, available=est.available)
            if e.total <= budget or b == 1:
                text = (f"--batch-size {b} --gradient-accumulation {math.ceil(est.batch_size * ga / b)}"
                        + (f" with gradient checkpointing ({ckpt_how})" if ckpt and not est.checkpointing else ""))
                candidates.append((text, e))
                break
        if not est.checkpointing and ckpt:
            e = estimate(params, config=config, device=est.device, seq_len=est.seq_len, checkpointing=True,
                         available=est.available)
            candidates.append((f"gradient checkpointing ({ckpt_how})", e))
    if not params.quantization:
        q = replace_method(params, finetuning_type="lora", quantization="int4")
        e = estimate(q, config=config, device=est.device, seq_len=est.seq_len, checkpointing=True,
                     available=est.available)
        candidates.append(("QLoRA with gradient checkpointing: --peft --quantization int4", e))
    if est.seq_len > 256:
        e = estimate(params, config=config, device=est.device, batch_size=1, seq_len=256,
                     checkpointing=est.checkpointing, available=est.available)
        candidates.append(("a shorter --block-size, e.g. 256 with --batch-size 1", e))
    fitting = [(t, e) for t, e in candidates if e.total <= budget]
    if fitting:
        fix = "; or ".join(f"{t} (~{_gib(e.total)})" for t, e in fitting)
        if params.auto_find_batch_size is False:
            fix += "; --auto-find-batch-size picks the batch for you"
    else:
        t, e = min(candidates, key=lambda c: c[1].total)
        fix = (f"nothing simple fits; the smallest is {t} (~{_gib(e.total)}): use a smaller model or a "
               "machine with more memory")
    return (f"This run needs about {_gib(est.total)} but {_gib(est.available)} is available on "
            f"{est.device} ({est.summary()}). Fix: {fix}. To start anyway: --no-memory-check "
            "(or --max-memory-gb with the memory you have).")


def replace_method(params, **changes):
    data = params.model_dump()
    data.update(changes)
    if changes.get("finetuning_type") == "lora":
        data["peft"] = True
    return type(params).model_validate(data)
