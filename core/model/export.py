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
                 max_shard_size="2GB", state_dict=None) -> dict[str, Path]:
    """Save model + tokenizer into out_dir; returns {"adapter": ..., "merged": ...} or {"model": ...}.

    The caller's model is not changed: merging reloads the base from disk and applies the saved
    adapter, which also proves the adapter on disk is complete. transformers 5 always writes
    safetensors for full models; safe_serialization applies to the adapter file. state_dict: the
    weights gathered from sharded ranks (DeepSpeed ZeRO-3, FSDP), whose local model holds none.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        # PiSSA rewrote the base weights in memory; converting against the initial adapter saves a
        # plain LoRA (rank 2r) of the original base, which is what reloads and merges from disk.
        pissa = getattr(model, "pissa_init_dir", None)
        extra = {"path_initial_model_for_weight_conversion": pissa} if pissa else {}
        model.save_pretrained(out, safe_serialization=safe_serialization, state_dict=state_dict, **extra)
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
        model.save_pretrained(out, max_shard_size=max_shard_size, state_dict=state_dict)
    finally:
        if config is not None and use_cache is False:
            config.use_cache = False
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"model": out}


def save_atomically(model, tokenizer, out: Path, parent: Path, max_shard_size) -> None:
    """Write model + tokenizer into a temporary sibling of out, then rename it into place: a crash
    leaves either the old directory or the complete new one."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.chmod(0o755)


def merge_adapter_dir(adapter_dir, out_dir, max_shard_size="2GB", *, trust_remote_code: bool = False,
                      device: str = "cpu", base: str | None = None) -> Path:
    """Load the adapter's base (fp32, on `device`), apply the adapter, merge, save base dtype to out_dir.

    Written into a temporary sibling directory and renamed into place, so a crash leaves no
    half-written model behind.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    base = resolve_model(base or adapter_base(adapter_dir))
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
    model = PeftModel.from_pretrained(model.to(device), adapter_dir).merge_and_unload().to("cpu")
    if isinstance(saved_dtype, torch.dtype) and saved_dtype.is_floating_point and saved_dtype != torch.float32:
        model = model.to(saved_dtype)
    tok = load_tokenizer(adapter_dir if _has_tokenizer(adapter_dir) else base,
                         trust_remote_code=trust_remote_code)

    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(model, tok, out, out.parent, max_shard_size)
    log.info("Merged adapter %s into %s", adapter_dir, out)
    return out


def export_model(source, out_dir, *, adapter=None, max_shard_size="2GB", device: str = "cpu",
                 quantization: str | None = None, gguf: tuple[str, ...] | list[str] = (),
                 chat_template: str | None = None, trust_remote_code: bool = False) -> dict:
    """`aitraining export`: one model directory out of a run, an adapter or a model.

    source: a model directory / id, a LoRA run or adapter directory (merged into its base), or
      empty with `adapter` given. adapter: merge this adapter into `source` (or into its own base).
    Writes <out_dir>/ safetensors shards of max_shard_size (+ tokenizer); with quantization int8 /
    int4 the weights are saved quantized by bitsandbytes (reloaded once to check them); with gguf
    output types (f32, f16, bf16, q8_0) also <out_dir>/<name>-<type>.gguf and an Ollama Modelfile.
    Returns {"model": dir, "gguf": [paths], "modelfile": path or None, "quantization": ...}.
    """
    from core.errors import ConfigError
    from core.model.loader import is_adapter_dir

    out = Path(out_dir)
    if quantization not in (None, "int8", "int4"):
        raise ConfigError(f"--quantization {quantization}: use int8 or int4 (bitsandbytes)")
    src = resolve_model(source) if source else None
    if adapter:
        adapter_src = resolve_model(adapter)
        if not is_adapter_dir(adapter_src):
            raise ConfigError(f"{adapter} holds no LoRA adapter (adapter_config.json). Fix: pass it as the "
                              "model instead (--model), or choose a run trained with --peft")
    elif src is not None and is_adapter_dir(src):
        adapter_src, src = src, None
    else:
        adapter_src = None
    if src is None and adapter_src is None:
        raise ConfigError("export needs --model (a model or run directory) or --adapter")
    staging = out if not quantization else Path(tempfile.mkdtemp(prefix=f".{out.name}.fp-", dir=_parent(out)))
    try:
        if adapter_src is not None:
            merge_adapter_dir(adapter_src, staging, max_shard_size, trust_remote_code=trust_remote_code,
                              device=device, base=str(src) if src is not None else None)
        else:
            _resave(src, staging, max_shard_size, device, trust_remote_code)
        written: dict = {"model": out, "gguf": [], "modelfile": None, "quantization": quantization}
        if quantization:
            _save_quantized(staging, out, quantization, max_shard_size)
        if gguf:
            from core.model.gguf_export import export_gguf
            from core.model.ollama import template_name_for, write_modelfile
            from transformers import AutoConfig

            tok = load_tokenizer(staging)
            model_type = AutoConfig.from_pretrained(staging).model_type
            for outtype in gguf:
                written["gguf"].append(export_gguf(staging, out, outtype=outtype, name=_name(source, adapter, out)))
            name = template_name_for(tok, chat_template, model_type)
            written["modelfile"] = write_modelfile(written["gguf"][-1], name, tok.eos_token)
    finally:
        if staging != out:
            shutil.rmtree(staging, ignore_errors=True)
    return written


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _name(source, adapter, out: Path) -> str:
    """The GGUF file's stem: the run's name when exporting a run, else the output directory's."""
    for p in (adapter, source):
        if p and Path(str(p)).exists():
            name = Path(str(p)).resolve().name
            return Path(str(p)).resolve().parent.name if name in ("merged", "adapter") else name
    return out.resolve().name


def _resave(src, out: Path, max_shard_size, device: str, trust_remote_code: bool) -> None:
    """A full model re-saved as safetensors shards of max_shard_size (its own dtype kept)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", trust_remote_code=trust_remote_code)
    tok = load_tokenizer(src, trust_remote_code=trust_remote_code)
    save_atomically(model.to(device), tok, out, _parent(out), max_shard_size)


def _save_quantized(src: Path, out: Path, quantization: str, max_shard_size) -> None:
    """Load src through bitsandbytes (int8 / int4 NF4), save the quantized weights, reload to check."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from core.errors import ConfigError

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"--quantization {quantization} needs bitsandbytes: pip install bitsandbytes") from None
    if quantization == "int4":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=torch.float32)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map=device,
                                                 dtype=torch.float32)
    tok = load_tokenizer(src)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out, device_map=device)  # the saved weights load back
    log.info("Saved %s weights (bitsandbytes) to %s", quantization, out)
