"""core.model.loader: resolving model ids, dtype/attention choice, loading (tiny model, offline)."""
import json
import logging

import pytest
import torch

from core.errors import ConfigError, ModelNotFoundError
from core.model import loader, packaged


@pytest.fixture(autouse=True)
def _fresh_warnings():
    loader._warned.clear()
    yield
    loader._warned.clear()


def test_resolve_local_dir(tiny_model_dir):
    assert loader.resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_resolve_dir_without_config(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="config.json") as e:
        loader.resolve_model(tmp_path)
    assert "merged" in str(e.value)  # the fix points at the loadable sub-directory


def test_resolve_missing_path():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        loader.resolve_model("./no/such/model-dir")


def test_resolve_unknown_id_lists_packaged(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as e:
        loader.resolve_model("nobody-here/no-such-model-xyz")
    text = str(e.value)
    for mid in packaged.packaged_ids():
        assert mid in text
    assert "HF_HUB_OFFLINE" in text


def test_resolve_adapter_dir(tmp_path, tiny_model_dir):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    assert loader.resolve_model(tmp_path) == tmp_path.resolve()
    assert loader.is_adapter_dir(loader.resolve_model(tmp_path))
    assert loader.adapter_base(tmp_path) == str(tiny_model_dir)


def test_resolve_packaged_alias_uses_cache(monkeypatch, tmp_path):
    # an alias resolves to the packaged copy without converting when the cache dir is present
    monkeypatch.setenv("AITRAINING_CACHE", str(tmp_path))
    d = packaged.cache_dir("smollm2-135m")
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / packaged.SOURCE_FILE).write_text("{}")
    assert loader.resolve_model("smollm2-135m") == d
    assert packaged.materialize("HuggingFaceTB/SmolLM2-135M-Instruct") == d


def test_dtype_cpu_without_native_bf16_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert loader.pick_dtype("bf16", "cpu") is torch.float32
    assert "no native bf16" in caplog.text
    assert loader.pick_dtype("fp16", "cpu") is torch.float32
    assert loader.pick_dtype(None, "cpu") is torch.float32


def test_dtype_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert loader.pick_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError):
        loader.pick_dtype("fp8", "cpu")


def test_attention_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(loader, "flash_attn_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert loader.pick_attention(None, True) == "sdpa"
        assert loader.pick_attention("flash_attention_2", False) == "sdpa"
    assert caplog.text.count("Flash Attention 2 was requested") == 1
    assert loader.pick_attention(None, False) == "sdpa"
    assert loader.pick_attention("eager", False) == "eager"
    with pytest.raises(ConfigError):
        loader.pick_attention("fast", False)


def test_load_tokenizer_and_model(tiny_model_dir):
    tok = loader.load_tokenizer(tiny_model_dir, padding_side="left")
    assert tok.pad_token is not None and tok.padding_side == "left"
    model = loader.load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa",
                              gradient_checkpointing=True)
    assert loader.is_checkpointing(model) and model.config.use_cache is False
    assert next(model.parameters()).dtype is torch.float32
