"""Saving what training produced: adapter, merged model or full model, always with the tokenizer.

    <out_dir>/adapter_config.json, adapter_model.safetensors, tokenizer files   (LoRA)
    <out_dir>/merged/config.json, model*.safetensors, tokenizer files           (LoRA + merge_adapter)
    <out_dir>/config.json, model*.safetensors, tokenizer files                  (full, freeze)
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from core.model.loader import ADAPTER_CONFIG, adapter_base, load_tokenizer, resolve_model, _has_tokenizer

log = logging.getLogger(__name__)


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_trained(model, tokenizer, out_dir, *, merge_adapter: bool = True, safe_serialization: bool = True,
                 max_shard_size="2GB") -> dict[str, Path]:
    """Save model + tokenizer into out_dir; returns {"adapter": ..., "merged": ...} or {"model": ...}.

    The caller's model is not changed: merging reloads the base from disk and applies the saved
    adapter, which also proves the adapter on disk is complete. transformers 5 always writes
    safetensors for full models; safe_serialization applies to the adapter file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        # PiSSA rewrote the base weights in memory; converting against the initial adapter saves a
        # plain LoRA (rank 2r) of the original base, which is what reloads and merges from disk.
        pissa = getattr(model, "pissa_init_dir", None)
        extra = {"path_initial_model_for_weight_conversion": pissa} if pissa else {}
        model.save_pretrained(out, safe_serialization=safe_serialization, **extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        written = {"adapter": out}
        if merge_adapter:
            written["merged"] = merge_adapter_dir(out, out / "merged", max_shard_size=max_shard_size)
        return written
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None and use_cache is False:
        config.use_cache = True  # training turns the KV cache off; the saved model should generate fast
    try:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    finally:
        if config is not None and use_cache is False:
            config.use_cache = False
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"model": out}


def merge_adapter_dir(adapter_dir, out_dir, max_shard_size="2GB", *, trust_remote_code: bool = False) -> Path:
    """Load the adapter's base (fp32, CPU), apply the adapter, merge, save base dtype to out_dir.

    Written into a temporary sibling directory and renamed into place, so a crash leaves no
    half-written model behind.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    base = resolve_model(adapter_base(adapter_dir))
    task = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("task_type")
    cls = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    saved_dtype = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype, None)

    # merge in fp32: W + B@A * scale is exact enough there; cast back to the base's dtype afterwards
    # a reward model's adapter carries a one-label score head (--trainer reward)
    extra = {"num_labels": 1} if task == "SEQ_CLS" else {}
    model = cls.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra)
    if task == "SEQ_CLS" and model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(base).pad_token_id
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    if isinstance(saved_dtype, torch.dtype) and saved_dtype.is_floating_point and saved_dtype != torch.float32:
        model = model.to(saved_dtype)
    tok = load_tokenizer(adapter_dir if _has_tokenizer(adapter_dir) else base,
                         trust_remote_code=trust_remote_code)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.chmod(0o755)
    log.info("Merged adapter %s into %s", adapter_dir, out)
    return out
