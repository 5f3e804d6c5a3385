"""bench/throughput.py and bench/allocator.py run end to end (smoke tests: tiny model, one repetition)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_throughput_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--model", "tiny", "--reps", "1",
                          "--steps", "2", "--batch", "4", "--seq", "128", "--engines", "ours,baseline,trl", "--json", str(out)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ours", "baseline", "trl"}
    for engine, runs in results.items():
        (run,) = runs
        assert run["steps"] == 2, engine
        assert run["tokens_per_s"] > 0 and run["peak_mib"] > 100 and 0 <= run["padding"] < 1, run
        assert run["trainable"] < run["params"]  # LoRA: only adapters train
    # the three trained the same LoRA shape on the same model
    assert len({r[0]["trainable"] for r in results.values()}) == 1
    assert "| ours | **median** |" in res.stdout and "ours / baseline: trained tokens/s x" in res.stdout
    # baseline ran first and ours got its peak as the memory budget, less what its process held
    (ours,), (base,) = results["ours"], results["baseline"]
    assert 0 < ours["budget_gib"] < base["peak_mib"] / 1024
    assert ours["checkpointed"].endswith("/2")


@pytest.mark.slow
def test_allocator_bench_smoke():
    res = subprocess.run([sys.executable, str(REPO / "bench" / "allocator.py"), "--model", "tiny", "--reps", "1",
                          "--steps", "2"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count("| jemalloc |") == 2 and res.stdout.count("| system |") == 2
    assert "checkpointing off: jemalloc / glibc peak growth x" in res.stdout
