"""Optional speed and memory boosters, each detected lazily with a clear fallback.

unsloth   FastLanguageModel loading + LoRA (seed 001): sft only, llama/mistral/gemma/qwen2 only, CUDA.
liger     Liger Triton kernels through transformers' use_liger_kernel (CUDA + the liger-kernel package).
hqq       Half-Quadratic Quantization of the decoder's linear layers (--quantization-method hqq).
pre-quantized checkpoints (GPTQ, AWQ, ...) load through transformers when their package is present.
"""
from __future__ import annotations

import importlib.util
import logging

from core.errors import ConfigError

log = logging.getLogger("aitraining")

UNSLOTH_WARNING = "WARNING: Unsloth not available, continuing without it..."
# seed 001: the families Unsloth is used for (gemma covers Gemma and Gemma 2)
UNSLOTH_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "gemma": "gemma", "gemma2": "gemma",
                       "qwen2": "qwen2"}
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def use_unsloth(params, model_type: str | None) -> bool:
    """Whether this run loads through Unsloth; every case that cannot prints its warning and
    continues on transformers + peft (seed 001's fallback behaviour)."""
    if not params.unsloth:
        return False
    if params.stage != "sft":
        log.warning("WARNING: Unsloth supports only --trainer sft/default; training '%s' without it...",
                    params.trainer)
        return False
    if (model_type or "") not in UNSLOTH_MODEL_TYPES:
        log.warning("WARNING: Unsloth does not support model type '%s' (supported: llama, mistral, gemma, "
                    "qwen2); continuing without it...", model_type)
        return False
    if params.finetuning_type != "lora":
        log.warning("WARNING: Unsloth is used here for LoRA training (--peft); continuing without it...")
        return False
    if params.quantization_method != "bitsandbytes" and params.quantization:
        log.warning("WARNING: Unsloth quantizes with bitsandbytes, not %s; continuing without it...",
                    params.quantization_method)
        return False
    if importlib.util.find_spec("unsloth") is None or not _cuda():
        log.warning(UNSLOTH_WARNING)
        return False
    try:
        import unsloth  # noqa: F401  (must be imported before transformers' models are built)
    except Exception as e:  # a broken install (e.g. torch/triton mismatch) must not stop the run
        log.warning("%s (%s: %s)", UNSLOTH_WARNING, type(e).__name__, str(e).splitlines()[0][:200])
        return False
    if params.use_sharegpt_mapping:
        log.info("--use-sharegpt-mapping: ShareGPT records (from/value, human/gpt) are read as they are; "
                 "no conversion step runs before Unsloth")
    return True


def load_unsloth(params, path, *, dtype, max_seq_length: int):
    """(PeftModel from Unsloth) with its LoRA on the seed's target modules and Unsloth's own
    gradient checkpointing; int4/int8 load through bitsandbytes inside Unsloth."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(path), max_seq_length=max_seq_length, dtype=dtype,
        load_in_4bit=params.quantization == "int4", load_in_8bit=params.quantization == "int8",
        trust_remote_code=params.trust_remote_code)
    targets = UNSLOTH_TARGETS if params.target_modules in ("all-linear", "", None) else \
        [t.strip() for t in params.target_modules.split(",") if t.strip()]
    model = FastLanguageModel.get_peft_model(
        model, r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
        target_modules=targets, bias="none", use_rslora=params.use_rslora,
        use_gradient_checkpointing="unsloth" if not params.disable_gradient_checkpointing else False,
        random_state=params.seed)
    log.info("Unsloth: loaded %s with LoRA on %s", path, ", ".join(targets))
    return model


def use_liger(params) -> bool:
    """--liger-kernel when it can run: the package and a CUDA GPU (its kernels are Triton)."""
    if not params.liger_kernel:
        return False
    if not _cuda():
        log.warning("WARNING: --liger-kernel needs a CUDA GPU (Triton kernels); continuing without it...")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        log.warning("WARNING: --liger-kernel: the liger-kernel package is not installed (pip install "
                    "liger-kernel); continuing without it...")
        return False
    return True


# pre-quantized checkpoints: quant_method in config.json -> (module to find, pip install line)
PREQUANTIZED = {"gptq": (("gptqmodel", "auto_gptq"), "pip install gptqmodel optimum"),
                "awq": (("awq", "gptqmodel"), "pip install autoawq"),
                "aqlm": (("aqlm",), "pip install aqlm"), "eetq": (("eetq",), "pip install eetq"),
                "hqq": (("hqq",), "pip install hqq")}


def check_prequantized(config, params) -> str | None:
    """The quant_method of a pre-quantized checkpoint (None if it is not one); ConfigError when its
    package is missing or when --quantization would quantize it a second time."""
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    method = str(qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "")).lower()
    method = method.split(".")[-1]  # an enum prints as QuantizationMethod.GPTQ
    if params.quantization:
        raise ConfigError(f"{params.model} is already quantized ({method}); drop --quantization (LoRA trains "
                          "on it as it is)")
    if params.finetuning_type != "lora":
        raise ConfigError(f"{params.model} is quantized ({method}): only LoRA can train it. Fix: add --peft")
    modules, pip = PREQUANTIZED.get(method, ((), None))
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise ConfigError(f"{params.model} is a {method.upper()} checkpoint and its package is not installed. "
                          f"Fix: {pip}")
    return method


def hqq_quantize(model, *, bits: int, compute_dtype, group_size: int = 64):
    """Replace the decoder layers' nn.Linear with HQQLinear (bits 4 or 8) in place; peft then puts
    its LoRA on them. lm_head and the embeddings stay in full precision."""
    if importlib.util.find_spec("hqq") is None:
        raise ConfigError("--quantization-method hqq needs the hqq package. Fix: pip install hqq "
                          "(or pip install -e \".[hqq]\"), or use --quantization-method bitsandbytes")
    import torch.nn as nn
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from core.model.adapters import find_layer_stack

    device = next(model.parameters()).device
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    _, layers = find_layer_stack(model)
    count = 0
    for module in layers.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, HQQLinear(child, quant_config=cfg, compute_dtype=compute_dtype,
                                                device=str(device), del_orig=True))
                count += 1
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_hqq_quantized = True
    log.info("HQQ: %d linear layers quantized to %d bits (group %d)", count, bits, group_size)
    return model
