"""The monitor on a long run: a 100k-line trainer_log.jsonl. A tick reads only the bytes appended
since the last one (counted by the kernel: /proc/self/io rchar), the numbers shown are the log's,
and the plot gets a thinned curve that still holds the spike, the first and the last point."""
import json
import math
import os
from pathlib import Path

from core.events import LOG_FILE, smooth, write_status
from webui.runner import PLOT_POINTS, Monitor, Runner
from webui.tabs.train import monitor_tick

N = 100_000
SPIKE = 54_321


def loss_at(step: int) -> float:
    return 50.0 if step == SPIKE else 2.0 + math.sin(step / 500) + 1.0 / step


def line(step: int, total: int) -> str:
    rec = {"step": step, "total_steps": total, "epoch": round(step / 1000, 4), "loss": loss_at(step),
           "lr": 1e-4, "grad_norm": 0.5, "elapsed": step * 0.1, "remaining": (total - step) * 0.1,
           "percentage": round(100 * step / total, 2)}
    if step % 1000 == 0:
        rec["eval_loss"] = 3.0 - step / N
    return json.dumps(rec) + "\n"


def rchar() -> int:
    """Bytes this process has read through read()-like calls, as the kernel counts them."""
    with open("/proc/self/io", encoding="ascii") as f:
        return int(next(x for x in f if x.startswith("rchar:")).split()[1])


def test_a_tick_on_a_100k_line_log_reads_only_new_bytes_and_shows_right_numbers(tmp_path):
    root = tmp_path / "runs"
    run = root / "long"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: llm-sft\n", encoding="utf-8")
    total = N + 3
    with open(run / LOG_FILE, "w", encoding="utf-8") as f:
        f.writelines(line(i, total) for i in range(1, N + 1))
    size = (run / LOG_FILE).stat().st_size
    assert size > 10_000_000
    write_status(run, "running", pid=os.getpid(), step=N, total_steps=total)  # alive: this process
    runner, mon = Runner(root), Monitor()

    first = monitor_tick(runner, mon, None, "loss", "en")  # a new page reads the log once
    assert first["target"] == run and mon.count == N and mon.offset == size
    assert f"data-step='{N}' data-total='{total}'" in first["progress"]
    frame = first["plot"]
    raw = frame[frame.series == "loss"]
    assert len(raw) <= PLOT_POINTS + 2, len(raw)  # thinned for display...
    assert (raw.step.iloc[0], raw.step.iloc[-1]) == (1, N)  # ...from the first to the last step
    assert raw.value.max() == 50.0 and raw[raw.value == 50.0].step.tolist() == [SPIKE]  # the spike survives
    assert abs(raw.value.min() - min(loss_at(i) for i in range(1, N + 1))) < 1e-12
    smoothed = frame[frame.series == "smoothed"]
    full = smooth([loss_at(i) for i in range(1, N + 1)])
    assert len(smoothed) <= PLOT_POINTS + 2
    assert smoothed.step.iloc[-1] == N and abs(smoothed.value.iloc[-1] - full[-1]) < 1e-9
    for s, v in zip(smoothed.step, smoothed.value):  # every shown point is the exact EMA there
        assert abs(v - full[s - 1]) < 1e-9
    evals = frame[frame.series == "eval_loss"]  # 100 points: all shown, exact
    assert evals.step.tolist() == list(range(1000, N + 1, 1000))
    assert evals.value.tolist() == [3.0 - s / N for s in range(1000, N + 1, 1000)]
    assert first["metrics"] == ["loss", "grad_norm", "lr"]

    # the next ticks: three new lines, then nothing new
    appended = "".join(line(i, total) for i in range(N + 1, N + 4)).encode()
    with open(run / LOG_FILE, "ab") as f:
        f.write(appended)
    before = rchar()
    second = monitor_tick(runner, mon, None, "loss", "en")
    read = rchar() - before
    # the new lines, status.json and the 8 kB running.log tail; never the 15 MB log again
    assert read < 64_000, f"a tick read {read} bytes of a {size}-byte log"
    assert mon.count == N + 3 and mon.offset == size + len(appended)
    assert f"data-step='{N + 3}' data-total='{total}'" in second["progress"]
    frame = second["plot"]
    assert frame[frame.series == "loss"].step.iloc[-1] == N + 3
    assert abs(frame[frame.series == "loss"].value.iloc[-1] - loss_at(N + 3)) < 1e-12
    full = smooth([loss_at(i) for i in range(1, N + 4)])
    assert abs(frame[frame.series == "smoothed"].value.iloc[-1] - full[-1]) < 1e-9

    before = rchar()
    idle = monitor_tick(runner, mon, None, "loss", "en")
    assert rchar() - before < 64_000
    assert idle["plot"] is None and idle["metrics"] is None  # nothing redrawn

    other = monitor_tick(runner, mon, None, "grad_norm", "en")  # another metric, from memory
    assert other["plot"] is None  # (the selector's change handler draws it)
    from webui.tabs.train import plot_frame

    g = plot_frame(mon, "grad_norm")
    assert set(g.series) == {"grad_norm"} and len(g) <= PLOT_POINTS + 2 and (g.value == 0.5).all()


def test_short_curves_are_shown_whole():
    mon = Monitor()
    for i in range(1, 11):
        mon._add({"step": i, "loss": float(i), "total_steps": 10})
    from webui.tabs.train import plot_frame

    frame = plot_frame(mon, "loss")
    assert frame[frame.series == "loss"].value.tolist() == [float(i) for i in range(1, 11)]
    assert frame[frame.series == "smoothed"].value.tolist() == smooth([float(i) for i in range(1, 11)])
