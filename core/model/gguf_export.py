"""GGUF export for the llama, qwen2 and gemma (2/3 text) families, written with the `gguf` package.

    from core.model.gguf_export import export_gguf
    path = export_gguf("./models/run/merged", "./models/run/gguf", outtype="f16")

transformers reads GGUF but cannot write it, so the mapping is ours, following llama.cpp's
conventions (the ones transformers undoes when it loads a file back):
- tensor names from gguf's own name table (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`);
- llama: q/k rows permuted from HF's rotate-half layout to llama.cpp's interleaved rope layout;
- gemma: every RMSNorm weight stored as w + 1 (Gemma's norm multiplies by 1 + w);
- 1-D tensors (norms, biases) stay f32 whatever the output type, as llama.cpp keeps them;
- the tokenizer as metadata: tokens in id order, token types (control for special tokens),
  merges for BPE vocabularies, scores, bos/eos/pad/unk ids, add-bos, and the chat template.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from core.errors import ConfigError

log = logging.getLogger(__name__)

# HF model_type -> GGUF architecture name
ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
         "gemma3_text": "gemma3"}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _qtype(outtype: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def _permute(w, n_head: int):
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (the inverse of what the loader does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _write_hparams(w, arch: str, cfg, n_vocab: int) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    rope = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in rope:  # gemma3: per layer type; the file's base is the global layers'
        rope = rope["full_attention"]
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    rtype = rope.get("rope_type", "default")
    if rtype not in ("default", None):
        if rtype == "linear":
            w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        else:
            log.warning("GGUF: rope scaling %r is not written; llama.cpp will use plain rope", rtype)
    w.add_rope_dimension_count(int(head_dim))
    w.add_vocab_size(n_vocab)
    if arch.startswith("gemma"):
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))


def _write_tokenizer(w, tok_dir: Path, tok, n_vocab: int, chat_template: str | None) -> None:
    """Tokenizer metadata from tokenizer.json: byte-level BPE as 'gpt2', sentencepiece-style as 'llama'."""
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export: {tok_dir}/tokenizer.json is a {model.get('type')} tokenizer; "
                          "only BPE vocabularies (byte-level or sentencepiece-style) are written")
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    user = {a["id"] for a in data.get("added_tokens", []) if not a.get("special")}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab  # UNUSED unless the vocabulary names the id
    for text, i in vocab.items():
        if i < n_vocab:
            tokens[i] = text
            types[i] = 3 if i in special else 4 if i in user else 1
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or \
        "ByteLevel" in json.dumps(data.get("decoder"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_name(data))
    else:  # sentencepiece converted to BPE (Llama 2, Gemma): byte-fallback pieces are BYTE tokens
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = 6
        w.add_token_scores([-float(i) for i in range(n_vocab)])  # merge order = vocabulary order
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                      ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        i = getattr(tok, f"{name}_token_id", None)
        if i is not None:
            add(int(i))
    from core.templates import _adds_bos

    w.add_add_bos_token(bool(_adds_bos(tok)))
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def _pre_name(data: dict) -> str:
    """llama.cpp's pre-tokenizer name, from the split regex in tokenizer.json."""
    text = json.dumps(data.get("pre_tokenizer"))
    if r"\\p{N}{1,3}" in text and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "llama-bpe"
    if r"\\p{N}" in text and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "qwen2"
    return "gpt-2" if '"use_regex": true' in text else "default"


def export_gguf(model_dir, out_dir, *, outtype: str = "f16", name: str | None = None,
                chat_template: str | None = None) -> Path:
    """Write <out_dir>/<name>-<outtype>.gguf from a HF model directory (a merged model, not an adapter)."""
    import numpy as np
    import torch
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.model.loader import load_tokenizer

    if outtype not in OUTTYPES:
        raise ConfigError(f"GGUF output type '{outtype}' is not one of {', '.join(OUTTYPES)}")
    model_dir, out = Path(model_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise ConfigError(f"GGUF export supports the {', '.join(sorted(set(ARCHS.values())))} families; "
                          f"{model_dir} is a '{config.model_type}' model. Fix: export safetensors instead")
    if not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(f"GGUF export needs {model_dir}/tokenizer.json (a fast tokenizer) to write the "
                          "vocabulary. Fix: save the tokenizer with the model")
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = _text_config(model.config)
    state = model.state_dict()
    tied = "lm_head.weight" not in state or getattr(cfg, "tie_word_embeddings", False)
    n_vocab = int(state["model.embed_tokens.weight"].shape[0]) if "model.embed_tokens.weight" in state \
        else int(cfg.vocab_size)
    name = name or model_dir.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{outtype}.gguf"

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(_file_type(outtype))
    _write_hparams(w, arch, cfg, n_vocab)
    source = chat_template if chat_template is not None else _own_template(tok)
    _write_tokenizer(w, model_dir, tok, n_vocab, source)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(cfg.num_hidden_layers))
    qtype = _qtype(outtype)
    n_head, n_kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        gname = names.get_name(base)
        if gname is None:
            if "rotary_emb" in hf_name:
                continue
            raise ConfigError(f"GGUF export: no GGUF name for tensor {hf_name} ({arch})")
        data = tensor.detach().float().numpy()
        if arch == "llama" and gname.endswith("attn_q"):
            data = _permute(data, n_head)
        elif arch == "llama" and gname.endswith("attn_k"):
            data = _permute(data, n_kv)
        if arch.startswith("gemma") and gname.endswith("norm"):
            data = data + 1.0
        full = f"{gname}.{suffix}"
        if data.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(full, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(full, data.astype(np.float16))
        else:  # bf16 / q8_0: packed bytes with the logical shape beside them
            packed = gguf.quants.quantize(data, qtype)
            w.add_tensor(full, packed, raw_shape=packed.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("GGUF written: %s (%s, %.1f MB)", path, outtype, path.stat().st_size / 2**20)
    return path


def _own_template(tok) -> str | None:
    from core.templates import _own_template as own

    return own(tok)
