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
                     freeze_extra_modules=None, adapter_path=None, use_rslora: bool = False,
                     use_dora: bool = False, pissa_init: bool = False, additional_target=None,
                     create_new_adapter: bool = False, work_dir=None):
    """Set requires_grad for the chosen method; for lora return the PeftModel wrapping model
    (a new adapter, or the one at adapter_path made trainable again).

    LoRA family: use_rslora (alpha/sqrt(r) scaling), use_dora (weight-decomposed), pissa_init
    (principal singular vectors; the initial adapter is kept in work_dir/pissa_init so the saved
    adapter converts back to a plain LoRA of the original base), additional_target (modules trained
    whole and saved with the adapter), create_new_adapter (merge adapter_path into the base, save
    that base in work_dir/base_merged, and train a new adapter on it)."""
    kind = (finetuning_type or "").strip().lower()
    if kind not in FINETUNING_TYPES:
        raise ConfigError(f"finetuning_type '{finetuning_type}' is not one of {', '.join(FINETUNING_TYPES)}. "
                          "Fix: use --finetuning-type lora (or --peft), freeze or full")
    quantized = getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_hqq_quantized", False)
    if quantized and kind != "lora":
        raise ConfigError(f"A quantized model can only be trained with LoRA, not '{kind}'. "
                          "Fix: use --peft, or drop --quantization")
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    elif kind == "freeze":
        _apply_freeze(model, freeze_trainable_layers, freeze_trainable_modules, freeze_extra_modules)
    elif adapter_path and not create_new_adapter:
        from peft import PeftModel

        _check_adapter_dir(adapter_path)
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
    else:
        from pathlib import Path

        if adapter_path:  # create_new_adapter: the old adapter becomes part of the base
            model = _merge_into_base(model, adapter_path, quantized, Path(work_dir or ".") / "base_merged")
        model = _apply_lora(model, lora_r, lora_alpha, lora_dropout, target_modules, quantized,
                            use_rslora=use_rslora, use_dora=use_dora, pissa_init=pissa_init,
                            modules_to_save=_names(additional_target))
        if pissa_init:
            init_dir = Path(work_dir or ".") / "pissa_init"
            model.save_pretrained(init_dir)  # the starting point the saved adapter is converted against
            model.pissa_init_dir = str(init_dir)
    trainable, total = trainable_summary(model)
    log.info("%s: %s of %s parameters trainable (%.2f%%)", kind, f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return model


def _check_adapter_dir(adapter_path) -> None:
    from core.model.loader import is_adapter_dir

    if not is_adapter_dir(adapter_path):
        raise ConfigError(f"--adapter-path {adapter_path}: no adapter_config.json there. Fix: point it at "
                          "a LoRA run directory (the one holding adapter_model.safetensors)")


def _merge_into_base(model, adapter_path, quantized: bool, out_dir):
    """Merge adapter_path into model and save the result as the new adapter's base, so the adapter
    trained next reloads (chat, merge) on exactly the weights it was trained on."""
    from peft import PeftModel

    _check_adapter_dir(adapter_path)
    if quantized:
        raise ConfigError("--create-new-adapter merges the old adapter into the base, which a quantized base "
                          "cannot hold exactly. Fix: drop --quantization, or continue the adapter without "
                          "--create-new-adapter")
    out_dir = out_dir.resolve()  # the adapter config records it: it must not depend on the cwd
    model = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    model.save_pretrained(out_dir)
    model.name_or_path = str(out_dir)  # peft records this as the new adapter's base_model_name_or_path
    model.config._name_or_path = str(out_dir)
    log.info("merged adapter %s into the base (saved in %s); training a new adapter on top", adapter_path, out_dir)
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


def _apply_lora(model, r, alpha, dropout, target_modules, quantized, *, use_rslora=False, use_dora=False,
                pissa_init=False, modules_to_save=None):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    names = _names(target_modules)
    targets = None if names in (None, ["all-linear"]) else names
    hqq = _hqq_linear_names(model)
    if hqq and not targets:  # peft's all-linear does not see HQQ layers: name them
        targets = hqq
    if modules_to_save:
        known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
        unknown = [m for m in modules_to_save if m not in known]
        if unknown:
            raise ConfigError(f"additional_target: {', '.join(unknown)} is not a module of this model. "
                              "Fix: name modules like embed_tokens, lm_head or norm")
    if targets:
        available = sorted(set(linear_module_names(model)) | set(hqq))
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
                        lora_dropout=float(dropout),
                        target_modules=targets or "all-linear", use_rslora=bool(use_rslora),
                        use_dora=bool(use_dora), init_lora_weights="pissa_niter_16" if pissa_init else True,
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    model = get_peft_model(model, config)
    if is_checkpointing(model):
        model.enable_input_require_grads()
    return model


def _hqq_linear_names(model) -> list[str]:
    """Short names of HQQ-quantized linear layers (--quantization-method hqq)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if type(m).__name__ == "HQQLinear"})
