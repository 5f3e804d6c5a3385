"""Export: a LoRA adapter merged into its base answers exactly as base + adapter; shards of a chosen
size reload to the same model; int8 / int4 (bitsandbytes) exports reload as quantized layers; the
`aitraining export` command does it from a real subprocess and reports bad input without a traceback."""
import json
import subprocess
import sys

import pytest
import torch

IDS = torch.tensor([[2, 50, 60, 70, 80, 90, 100, 110]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) A and B, so merging really changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dir):
    """(base logits, base + adapter logits) computed through PEFT without merging."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = logits(base)
    return plain, logits(PeftModel.from_pretrained(base, adapter_dir))


def test_merge_gives_base_plus_adapter_logits_and_shards_reload(adapter_dir, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.model.export import export_model

    plain, with_adapter = reference
    assert (with_adapter - plain).abs().max() > 0.1  # the adapter matters, so the check below can fail
    out = tmp_path / "merged"
    export_model(adapter_dir, out, max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards  # ~200 KB of fp32 weights in shards of at most 40 KB
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(merged), with_adapter, atol=1e-4, rtol=1e-4)


def test_export_cli_merges_an_explicit_adapter_and_quantizes_int8(tiny_model_dir, adapter_dir, reference,
                                                                  tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "int8"
    proc = subprocess.run([sys.executable, "-m", "core.cli", "export", "--model", str(tiny_model_dir),
                           "--adapter", str(adapter_dir), "--output", str(out), "--quantization", "int8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported model: {out}" in proc.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    got, want = logits(model), reference[1]
    # int8 weights with fp16 activations: close to the merged fp32 model, not bit-equal
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


@pytest.mark.slow
def test_export_int4_reloads_as_nf4(adapter_dir, reference, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from core.model.export import export_model

    out = tmp_path / "int4"
    export_model(adapter_dir, out, quantization="int4")
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    got, want = logits(model).flatten(), reference[1].flatten()
    # 4-bit NF4 of random weights is coarse: the logits still point the same way as the fp32 model's
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.8


def test_export_cli_errors_are_one_line_without_traceback(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "core.cli", "export", "--model", str(tiny_model_dir),
                           "--adapter", str(tiny_model_dir), "--output", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "holds no LoRA adapter" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "core.cli", "export", "--model", str(tiny_model_dir),
                           "--gguf", "q3_weird"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown output type" in proc.stderr
