"""GGUF export round trip: tiny llama, qwen2 and gemma3-text models are written with our GGUFWriter
mapping, loaded back with transformers (`gguf_file=`), and must give the source model's logits:
f32 to 1e-4 absolute (bit-exact in practice), f16 to 2e-2 absolute (|logits| here are up to ~10).
The tokenizer read back from the file encodes like the source and carries the chat template; the
Ollama Modelfile beside it has the template and the stop words of our templates/ registry."""
import subprocess
import sys

import pytest
import torch

from conftest import TINY_TOKENIZER

PROMPTS = ["What is the capital of France? Paris.", "<|im_start|>user\nOlá, tudo bem?<|im_end|>\n",
           "你好!我是一个人工智能助手。", "1 + 2 = 3; (x) [y] {z}"]
TOL = {"f32": 1e-4, "f16": 2e-2}


def _build(kind: str, out):
    """A tiny random model of the family, saved with the committed tokenizer and a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, Qwen2Config

    from core.templates import load_template

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    if kind == "qwen2":  # Qwen2's own split (digits one by one), which GGUF readers apply to qwen2 files
        from tokenizers import Regex, pre_tokenizers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.2)
    cfg = {"llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
           "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
           # a sliding window shorter than the prompts, so local and global layers both matter
           "gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=4, tie_word_embeddings=True),
           }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if kind == "gemma3":  # norms start at zero in Gemma (scale 1 + w): make the +1 offset observable
        for n, p in model.named_parameters():
            if "norm" in n:
                torch.nn.init.normal_(p, std=0.3)
    tok.chat_template = load_template({"llama": "llama3", "qwen2": "chatml", "gemma3": "gemma"}[kind]).source
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def family(request, tmp_path_factory):
    return request.param, _build(request.param, tmp_path_factory.mktemp(request.param))


def test_gguf_round_trip_logits_match(family, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.model.gguf_export import export_gguf

    kind, src = family
    want_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    src_tok = AutoTokenizer.from_pretrained(src)
    for outtype in ("f32", "f16"):
        path = export_gguf(src, tmp_path, outtype=outtype)
        assert path.name == f"{src.name}-{outtype}.gguf"
        pre = bytes(GGUFReader(path).fields["tokenizer.ggml.pre"].parts[-1]).decode()
        assert pre == {"llama": "gpt-2", "qwen2": "qwen2", "gemma3": "gpt-2"}[kind]
        got_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        assert got_model.config.model_type == want_model.config.model_type
        got_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert got_tok.chat_template == src_tok.chat_template
        worst = 0.0
        for text in PROMPTS:
            ids = src_tok.encode(text, return_tensors="pt")
            assert got_tok.encode(text) == ids[0].tolist(), text
            with torch.no_grad():
                want, got = want_model(ids).logits, got_model(ids).logits
            worst = max(worst, (want - got).abs().max().item())
        assert worst <= TOL[outtype], f"{kind} {outtype}: logits differ by {worst}"


@pytest.mark.slow
def test_export_cli_writes_gguf_and_ollama_modelfile(tmp_path):
    src = _build("gemma3", tmp_path / "gemma-run")
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "core.cli", "export", "--model", str(src), "--output", str(out),
                           "--gguf", "f16,q8_0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "gemma-run-f16.gguf").is_file() and (out / "gemma-run-q8_0.gguf").is_file()
    assert (out / "model.safetensors").is_file()  # the merged / re-saved model beside the GGUFs
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./gemma-run-q8_0.gguf\n")
    assert '<start_of_turn>user\n' in text and '<start_of_turn>model\n"""' in text
    assert 'PARAMETER stop "<end_of_turn>"' in text and 'PARAMETER stop "<eos>"' in text


def test_modelfile_follows_the_template_registry():
    from core.model.ollama import GO_TEMPLATES, modelfile_text
    from core.templates import list_templates, load_template

    # every shipped template has an Ollama twin, so no export ends up without a TEMPLATE
    assert {load_template(n).name for n in list_templates()} <= set(GO_TEMPLATES)
    text = modelfile_text("m.gguf", "chatml", "<|endoftext|>")
    assert "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in text
    assert text.count("PARAMETER stop") == 2 and 'PARAMETER stop "<|im_end|>"' in text
    llama = modelfile_text("m.gguf", "llama3")
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n"""' in llama and 'stop "<|eot_id|>"' in llama
    unknown = modelfile_text("m.gguf", None, "</s>")
    assert "TEMPLATE" not in unknown.replace("write its TEMPLATE", "") and 'stop "</s>"' in unknown


def test_gguf_refuses_other_families(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from core.errors import ConfigError
    from core.model.gguf_export import export_gguf

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'gpt2' model"):
        export_gguf(tmp_path, tmp_path / "g")
