"""QLoRA through bitsandbytes (its CPU backend here): int4 (NF4) and int8 load quantized, only the
LoRA parameters train, and the adapter merges into the full-precision base, reloads and generates."""
import pytest
import torch

from core import Project
from core.events import read_log, read_status

from conftest import write_alpaca
from test_sft import base_params

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_qlora_trains_only_lora_on_a_quantized_model(kind, tiny_model_dir, tmp_path, spy_model):
    import bitsandbytes as bnb

    from core.model.loader import load_for_inference

    out = tmp_path / f"run-{kind}"
    p = base_params(tiny_model_dir, write_alpaca(tmp_path / "train.jsonl"), out, peft=True,
                    quantization=kind, epochs=4, lr=2e-2,
                    # bitsandbytes' CPU inference repacks 4-bit weights in place on the first
                    # generate (same values, new layout), which would read as "changed" below
                    post_train_check=False)
    assert Project(p, process=False).create() == 0

    model, before = spy_model["model"], spy_model["before"]
    assert model.base_model.model.hf_quantizer is not None
    quantized = bnb.nn.Linear4bit if kind == "int4" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, quantized) for m in model.modules()), f"no {quantized.__name__} module"
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"

    records, _ = read_log(out / "trainer_log.jsonl")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert read_status(out)["state"] == "finished"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    merged = out / "merged"
    assert "quantization_config" not in (merged / "config.json").read_text()  # full precision
    for path in (out, merged):
        m, tok = load_for_inference(str(path))
        ids = tok.apply_chat_template([{"role": "user", "content": "What is two plus two?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = m.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        assert gen.shape[1] > ids.shape[1]


def test_quantization_without_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util

    from core.errors import ConfigError
    from core.stages.common import quantization_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        quantization_config("int4", torch.float32)
