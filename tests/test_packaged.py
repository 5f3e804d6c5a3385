"""core.model.packaged: the offline default models converted from their GGUF packages."""
import json
import threading
import time

import pytest

from core.model import packaged


def test_table_and_aliases():
    assert packaged.packaged_ids() == ["google/gemma-3-270m", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert packaged.get("gemma3-270m").chat_template == "gemma"
    assert packaged.get("smollm2-135m").chat_template == "chatml"
    assert packaged.get("SmolLM2-135M-Instruct").model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert packaged.get("gpt2") is None and not packaged.is_available("gpt2")


def test_two_converters_convert_once(monkeypatch, tmp_path):
    """The file lock makes a second caller wait and then reuse the first one's result."""
    monkeypatch.setenv("AITRAINING_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: object())
    calls = []

    def fake_convert(p, out):
        calls.append(p.model_id)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")
        (out / packaged.SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(packaged, "_convert", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(packaged.materialize("smollm2-135m")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert results == [packaged.cache_dir("smollm2-135m")] * 2
    assert sorted(x.name for x in (tmp_path / "models").iterdir()) == [
        ".HuggingFaceTB--SmolLM2-135M-Instruct.lock", "HuggingFaceTB--SmolLM2-135M-Instruct"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache so the conversion itself is tested (not a copy left by an older version)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AITRAINING_CACHE", str(tmp_path_factory.mktemp("aitraining-cache")))
    yield
    mp.undo()


def _check_converted(model_id, eos, load_limit_s=30):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not packaged.is_available(model_id):
        pytest.skip(f"package for {model_id} not installed")
    t0 = time.perf_counter()
    path = packaged.materialize(model_id)
    convert_s = time.perf_counter() - t0
    source = json.loads((path / packaged.SOURCE_FILE).read_text())
    assert source["model_id"] == model_id and not list(path.rglob("*.gguf"))

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    load_s = time.perf_counter() - t0
    assert load_s < load_limit_s
    assert tok.eos_token == eos and tok.pad_token is not None
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = model(**tok("The capital of France is", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()

    t0 = time.perf_counter()
    assert packaged.materialize(model_id) == path
    again_s = time.perf_counter() - t0
    assert again_s < 0.5
    print(f"\n{model_id}: convert {convert_s:.1f}s, cached load {load_s:.1f}s, "
          f"second materialize {again_s * 1000:.1f}ms")
    return model, tok


@pytest.mark.slow
def test_materialize_smollm2(cache):
    model, tok = _check_converted("HuggingFaceTB/SmolLM2-135M-Instruct", "<|im_end|>")
    assert "<|im_start|>" in tok.chat_template  # the GGUF's ChatML template is kept


@pytest.mark.slow
def test_materialize_gemma(cache):
    model, tok = _check_converted("google/gemma-3-270m", "<eos>")
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn != tok.unk_token_id
    assert end_of_turn in model.generation_config.eos_token_id  # chat generation stops at end of turn
