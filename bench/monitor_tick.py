"""How long one monitor tick takes on a long run, against a short one.

    PYTHONPATH=. python3 bench/monitor_tick.py [--lines 100000] [--ticks 40]

Two run directories: a trainer_log.jsonl of 100 lines and one of --lines lines. A page that opens
the run reads the log once (the cold tick, timed apart); after that every tick appends one line
(a training step) and runs the same code the page's timer runs (webui.tabs.train.monitor_tick:
status, log tail, new log bytes, the plot frame). Prints the median tick of each and the ratio.
A tick that re-read the file or redrew every point would grow with the log; this one should not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.events import LOG_FILE, write_status  # noqa: E402
from webui.runner import Monitor, Runner  # noqa: E402
from webui.tabs.train import monitor_tick  # noqa: E402


def line(step: int, total: int) -> str:
    rec = {"step": step, "total_steps": total, "epoch": step / 1000, "loss": 2 + math.sin(step / 500),
           "lr": 1e-4, "grad_norm": 0.5, "tokens_per_second": 1234.5, "elapsed": step * 0.1,
           "remaining": (total - step) * 0.1, "percentage": 100 * step / total}
    if step % 1000 == 0:
        rec["eval_loss"] = 2.5
    return json.dumps(rec) + "\n"


def measure(root: Path, lines: int, ticks: int) -> tuple[float, list[float]]:
    run = root / f"run-{lines}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: llm-sft\n", encoding="utf-8")
    (run / "running.log").write_text("".join(f"step {i} ok\n" for i in range(2000)), encoding="utf-8")
    total = lines + ticks
    with open(run / LOG_FILE, "w", encoding="utf-8") as f:
        f.writelines(line(i, total) for i in range(1, lines + 1))
    write_status(run, "running", pid=os.getpid(), step=lines, total_steps=total)
    runner, mon = Runner(root), Monitor()
    t0 = time.perf_counter()
    monitor_tick(runner, mon, str(run), "loss", "en")
    cold = time.perf_counter() - t0
    times = []
    for i in range(ticks):
        with open(run / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(line(lines + i + 1, total))
        t0 = time.perf_counter()
        out = monitor_tick(runner, mon, str(run), "loss", "en")
        times.append(time.perf_counter() - t0)
        assert out["plot"] is not None and mon.count == lines + i + 1
    write_status(run, "finished")
    return cold, times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--ticks", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small_cold, small = measure(Path(tmp) / "small", 100, args.ticks)
        big_cold, big = measure(Path(tmp) / "big", args.lines, args.ticks)
    s, b = statistics.median(small), statistics.median(big)
    print(f"tick median, {100:>7} lines: {s * 1000:7.2f} ms   (first tick {small_cold * 1000:7.1f} ms)")
    print(f"tick median, {args.lines:>7} lines: {b * 1000:7.2f} ms   (first tick {big_cold * 1000:7.1f} ms)")
    print(f"ratio {args.lines} / 100 lines: {b / s:.2f}x")


if __name__ == "__main__":
    main()
