"""Finetuning methods: which parameters train.

full   every parameter.
freeze the last n decoder layers (n > 0) or the first -n (n < 0), optionally only some of their
       sub-modules ("mlp,self_attn"), plus extra modules outside the stack ("embed_tokens,norm").
lora   peft LoRA adapters on "all-linear" or on named linear modules ("q_proj,v_proj").
"""
from __future__ import annotations

import logging

from core.errors import ConfigError
from core.model.loader import is_checkpointing

log = logging.getLogger(__name__)

FINETUNING_TYPES = ("full", "freeze", "lora")


def trainable_summary(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def apply_finetuning(model, *, finetuning_type: str, lora_r: int = 16, lora_alpha: int = 32,
                     lora_dropout: float = 0.05, target_modules="all-linear",
                     freeze_trainable_layers: int = 2, freeze_trainable_modules="all",
                     freeze_extra_modules=None, adapter_path=None):
    """Set requires_grad for the chosen method; for lora return the PeftModel wrapping model
    (a new adapter, or the one at adapter_path made trainable again)."""
    kind = (finetuning_type or "").strip().lower()
    if kind not in FINETUNING_TYPES:
        raise ConfigError(f"finetuning_type '{finetuning_type}' is not one of {', '.join(FINETUNING_TYPES)}. "
                          "Fix: use --finetuning-type lora (or --peft), freeze or full")
    quantized = getattr(model, "hf_quantizer", None) is not None
    if quantized and kind != "lora":
        raise ConfigError(f"A quantized model can only be trained with LoRA, not '{kind}'. "
                          "Fix: use --peft, or drop --quantization")
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    elif kind == "freeze":
        _apply_freeze(model, freeze_trainable_layers, freeze_trainable_modules, freeze_extra_modules)
    elif adapter_path:
        from peft import PeftModel

        from core.model.loader import is_adapter_dir

        if not is_adapter_dir(adapter_path):
            raise ConfigError(f"--adapter-path {adapter_path}: no adapter_config.json there. Fix: point it at "
                              "a LoRA run directory (the one holding adapter_model.safetensors)")
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
    else:
        model = _apply_lora(model, lora_r, lora_alpha, lora_dropout, target_modules, quantized)
    trainable, total = trainable_summary(model)
    log.info("%s: %s of %s parameters trainable (%.2f%%)", kind, f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return model


def _names(value) -> list[str] | None:
    """"a, b" or ["a", "b"] -> ["a", "b"]; "all" or empty -> None (meaning everything)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [s.strip() for s in items if s and s.strip()]
    return None if not items or items == ["all"] else items


def _matches(module_name: str, wanted: str) -> bool:
    # "mlp" matches "mlp" and "mlp.up_proj"; "self_attn.q_proj" matches as a dotted run
    return f".{wanted}." in f".{module_name}."


def find_layer_stack(model):
    """(prefix, ModuleList) of the decoder layers, e.g. ("model.layers", ...).

    The ModuleList whose length equals config.num_hidden_layers, else the longest one.
    """
    import torch.nn as nn

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no stack of layers, so freeze cannot pick layers. "
                          "Fix: use --finetuning-type lora or full")
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [x for x in lists if len(x[1]) == n_layers]
    return max(exact or lists, key=lambda x: len(x[1]))


def _apply_freeze(model, n: int, modules, extra) -> None:
    prefix, layers = find_layer_stack(model)
    total = len(layers)
    n = int(n)
    if abs(n) > total:
        raise ConfigError(f"freeze_trainable_layers={n} but the model has {total} layers. "
                          f"Fix: use a number between -{total} and {total}")
    chosen = range(total - n, total) if n > 0 else range(0, -n)
    for p in model.parameters():
        p.requires_grad_(False)

    wanted = _names(modules)
    if wanted:
        available = sorted({name for name, _ in layers[0].named_modules() if name})
        unknown = [w for w in wanted if not any(_matches(a, w) for a in available)]
        if unknown:
            raise ConfigError(f"freeze_trainable_modules: {', '.join(unknown)} not found in a decoder layer. "
                              f"Available: {', '.join(available)} (or all)")
    for i in chosen:
        layer = layers[i]
        if wanted is None:
            layer.requires_grad_(True)
            continue
        for name, sub in layer.named_modules():
            if name and any(_matches(name, w) for w in wanted):
                sub.requires_grad_(True)

    extras = _names(extra)
    if extras:
        outside = [(name, m) for name, m in model.named_modules()
                   if name and name != prefix and not name.startswith(prefix + ".")
                   and not prefix.startswith(name + ".") and any(True for _ in m.parameters())]
        unknown = [w for w in extras if not any(_matches(name, w) for name, _ in outside)]
        if unknown:
            names = sorted({name.rsplit(".", 1)[-1] for name, m in outside
                            if any(True for _ in m.parameters(recurse=False))})
            raise ConfigError(f"freeze_extra_modules: {', '.join(unknown)} not found outside the decoder "
                              f"layers. Available: {', '.join(names)}")
        for name, m in outside:
            if any(_matches(name, w) for w in extras):
                m.requires_grad_(True)  # a tied lm_head shares its weight with embed_tokens
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("freeze leaves no parameter trainable. Fix: set freeze_trainable_layers to a "
                          "non-zero number or name freeze_extra_modules")


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can target (q_proj, up_proj, lm_head, ...)."""
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if name and isinstance(m, (nn.Linear, Conv1D))})


def _apply_lora(model, r, alpha, dropout, target_modules, quantized):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    names = _names(target_modules)
    targets = None if names in (None, ["all-linear"]) else names
    if targets:
        available = linear_module_names(model)
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise ConfigError(f"target_modules: {', '.join(unknown)} is not a linear module of this model. "
                              f"Available: {', '.join(available)} (or all-linear)")
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=is_checkpointing(model),
            gradient_checkpointing_kwargs={"use_reentrant": False})
    # a reward model (AutoModelForSequenceClassification) needs SEQ_CLS so its score head trains and saves
    task = TaskType.SEQ_CLS if type(model).__name__.endswith("ForSequenceClassification") else TaskType.CAUSAL_LM
    config = LoraConfig(task_type=task, r=int(r), lora_alpha=int(alpha),
                        lora_dropout=float(dropout), target_modules=targets or "all-linear")
    model = get_peft_model(model, config)
    if is_checkpointing(model):
        model.enable_input_require_grads()
    return model
