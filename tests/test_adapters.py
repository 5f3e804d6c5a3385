"""core.model.adapters and core.model.export on the tiny Llama: who trains, what gets saved."""
import json

import pytest
import torch

from core.errors import ConfigError
from core.model import adapters, export, loader

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _load(path):
    return loader.load_model(path, dtype=torch.float32, attn_implementation="sdpa")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything(tiny_model_dir):
    model = adapters.apply_finetuning(_load(tiny_model_dir), finetuning_type="full")
    trainable, total = adapters.trainable_summary(model)
    assert trainable == total > 0


@pytest.mark.parametrize("n, layer", [(1, 1), (-1, 0)])
def test_freeze_layers(tiny_model_dir, n, layer):
    model = _load(tiny_model_dir)
    model = adapters.apply_finetuning(model, finetuning_type="freeze", freeze_trainable_layers=n)
    expected = {name for name, _ in model.named_parameters() if name.startswith(f"model.layers.{layer}.")}
    assert expected and _trainable(model) == expected


def test_freeze_modules_and_extras(tiny_model_dir):
    model = adapters.apply_finetuning(
        _load(tiny_model_dir), finetuning_type="freeze", freeze_trainable_layers=1,
        freeze_trainable_modules="mlp", freeze_extra_modules="embed_tokens,norm")
    assert _trainable(model) == {
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"}


def test_freeze_bad_names(tiny_model_dir):
    model = _load(tiny_model_dir)
    with pytest.raises(ConfigError, match="self_attn"):  # the error lists what exists
        adapters.apply_finetuning(model, finetuning_type="freeze", freeze_trainable_modules="attention")
    with pytest.raises(ConfigError, match="lm_head"):
        adapters.apply_finetuning(model, finetuning_type="freeze", freeze_extra_modules="wte")
    with pytest.raises(ConfigError, match="2 layers"):
        adapters.apply_finetuning(model, finetuning_type="freeze", freeze_trainable_layers=3)


def test_lora_all_linear(tiny_model_dir):
    model = adapters.apply_finetuning(_load(tiny_model_dir), finetuning_type="lora", lora_r=4, lora_alpha=8)
    names = _trainable(model)
    assert names and all("lora_" in n for n in names)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert targeted == LINEAR  # all-linear skips lm_head


def test_lora_named_targets_and_bad_target(tiny_model_dir):
    model = adapters.apply_finetuning(_load(tiny_model_dir), finetuning_type="lora",
                                      target_modules="q_proj, v_proj")
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in _trainable(model)} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="q_proj"):
        adapters.apply_finetuning(_load(tiny_model_dir), finetuning_type="lora", target_modules="qkv")


@pytest.fixture(scope="module")
def trained_lora(tiny_model_dir, tmp_path_factory):
    """A LoRA model with non-zero lora_B (so the adapter changes the output), saved with merge."""
    model = adapters.apply_finetuning(_load(tiny_model_dir), finetuning_type="lora", lora_r=4, lora_alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tok = loader.load_tokenizer(tiny_model_dir)
    out = tmp_path_factory.mktemp("run")
    written = export.save_trained(model, tok, out, merge_adapter=True)
    return model, tok, out, written


def test_save_trained_writes_adapter_and_merged(trained_lora, tiny_model_dir):
    model, _, out, written = trained_lora
    assert written == {"adapter": out, "merged": out / "merged"}
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer_config.json").is_file()
    assert any("lora_A" in n for n, _ in model.named_parameters())  # caller's model not merged


def test_merged_logits_equal_adapter_logits(trained_lora, tiny_model_dir):
    model, _, out, _ = trained_lora
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    model.eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        merged = _load(out / "merged")(input_ids=ids).logits
        base = _load(tiny_model_dir)(input_ids=ids).logits
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sub", ["", "merged"])
def test_load_for_inference_generates(trained_lora, sub):
    _, _, out, _ = trained_lora
    model, tok = loader.load_for_inference(out / sub if sub else out)
    assert tok.padding_side == "left"
    enc = tok(["hello world"], return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4


def test_save_trained_full_model(tiny_model_dir, tmp_path):
    model = adapters.apply_finetuning(_load(tiny_model_dir), finetuning_type="full")
    model.config.use_cache = False
    written = export.save_trained(model, loader.load_tokenizer(tiny_model_dir), tmp_path)
    assert written == {"model": tmp_path}
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False
    assert loader.resolve_model(tmp_path) == tmp_path.resolve()
