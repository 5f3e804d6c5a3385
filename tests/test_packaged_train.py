"""The issue's first command on the real packaged Gemma 3 270M: two LoRA steps, then chat."""
import shutil
import subprocess

import pytest
import torch

from core.events import read_log, read_status


@pytest.mark.slow
def test_gemma_270m_lora_two_steps_via_cli(tmp_path):
    out = tmp_path / "models" / "my-first"
    cmd = [shutil.which("aitraining"), "llm", "--train", "--model", "google/gemma-3-270m", "--data-path", "identity",
           "--project-name", str(out), "--trainer", "sft", "--peft", "--epochs", "1", "--max-samples", "16",
           # two short steps keep CI fast: ~10 s a step at 128 tokens on 2 cores
           "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation", "1", "--block-size", "128",
           "--logging-steps", "1", "--lr", "1e-4", "--no-merge-adapter"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_status(out)["state"] == "finished"
    records, _ = read_log(out / "trainer_log.jsonl")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), losses

    from core.model.loader import load_for_inference

    model, tok = load_for_inference(str(out))
    assert "<start_of_turn>" in tok.chat_template  # Gemma's template was trained and saved
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
