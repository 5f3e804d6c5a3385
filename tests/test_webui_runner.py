"""The web UI's runner with real training subprocesses on a tiny random Llama: start, one run at a
time, re-attach after a UI restart, abort with a checkpoint, and the monitor's incremental read
of trainer_log.jsonl. No mocks: the runs are `python -m core.run` in their own process groups."""
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import psutil
import pytest

from core import config_io
from core.errors import UserError
from core.events import LOG_FILE, read_log, read_status, write_status
from core.params import LLMTrainingParams
from webui.runner import (CONSOLE_FILE, BusyError, Monitor, Runner, describe, last_checkpoint, list_runs,
                          pid_alive, read_config, run_summary, tail)

from conftest import live_processes, write_alpaca


def params(tiny_model_dir, data, out, **kw) -> LLMTrainingParams:
    base = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), trainer="sft",
                chat_template="chatml", finetuning_type="lora", epochs=4, batch_size=2,
                gradient_accumulation=1, lr=1e-2, warmup_ratio=0.0, logging_steps=1, log="none",
                eval_strategy="no", save_strategy="steps", save_steps=2, merge_adapter=False)
    base.update(kw)
    return LLMTrainingParams(**base)

def wait_for(cond, timeout: float, what: str, interval: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return out

def console(run_dir: Path) -> str:
    return tail(run_dir / CONSOLE_FILE, 4000)


# -- Monitor ---------------------------------------------------------------------------------------

def rec(step: int, **kw) -> str:
    return json.dumps({"step": step, "loss": 1.0 / step, "note": "olá 你好", **kw}, ensure_ascii=False) + "\n"

def test_monitor_reads_only_new_complete_records(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = run / LOG_FILE
    mon = Monitor()
    assert mon.poll() == []  # following nothing
    mon.follow(run)
    assert mon.poll() == [] and mon.offset == 0  # no log yet

    with open(log, "ab") as f:
        f.write((rec(1) + rec(2)).encode())
        third = rec(3).encode()
        f.write(third[:10])  # the writer is mid-line
    new = mon.poll()
    assert [r["step"] for r in new] == [1, 2]
    assert mon.offset == len((rec(1) + rec(2)).encode())  # the partial line is left for later
    assert mon.poll() == []  # nothing new: no duplicates

    with open(log, "ab") as f:
        f.write(third[10:] + rec(4).encode())
    assert [r["step"] for r in mon.poll()] == [3, 4]
    assert mon.offset == log.stat().st_size
    assert list(mon.series["loss"].steps) == [1, 2, 3, 4] and mon.count == 4
    assert list(mon.series["loss"].values) == [1.0, 0.5, 1 / 3, 0.25]
    assert mon.last["note"] == "olá 你好" and mon.last["step"] == 4

    mon.follow(run)  # same run: nothing is re-read
    assert mon.poll() == [] and mon.count == 4

    other = tmp_path / "other"
    other.mkdir()
    (other / LOG_FILE).write_text(rec(10), encoding="utf-8")
    mon.follow(other)
    assert mon.offset == 0 and mon.count == 0 and mon.series == {}
    assert [r["step"] for r in mon.poll()] == [10]
    mon.follow(None)
    assert mon.poll() == [] and mon.count == 0 and mon.last is None

def test_monitor_byte_by_byte_writer_sees_every_record_once(tmp_path):
    lines = "".join(rec(i) for i in range(1, 8)).encode()
    (tmp_path / LOG_FILE).write_bytes(b"")
    mon = Monitor()
    mon.follow(tmp_path)
    seen = []
    with open(tmp_path / LOG_FILE, "ab", buffering=0) as f:
        for i in range(len(lines)):  # every cut, multi-byte characters included
            f.write(lines[i:i + 1])
            seen += mon.poll()
    assert [r["step"] for r in seen] == list(range(1, 8))
    assert mon.count == 7 and mon.last == seen[-1]

def test_monitor_starts_over_when_a_fresh_run_replaces_the_log(tmp_path):
    log = tmp_path / LOG_FILE
    log.write_text("".join(rec(i) for i in range(1, 6)), encoding="utf-8")
    mon = Monitor()
    mon.follow(tmp_path)
    assert len(mon.poll()) == 5
    log.unlink()  # Runner.start of a fresh run in the same directory drops the old curve
    assert mon.poll() == [] and mon.count == 0 and mon.series == {}
    log.write_text(rec(1, loss=9.0), encoding="utf-8")
    new = mon.poll()
    assert [(r["step"], r["loss"]) for r in new] == [(1, 9.0)] and mon.last == new[0]
    assert list(mon.series["loss"].values) == [9.0] and list(mon.smoothed.values) == [9.0]


# -- helpers of the runs table ---------------------------------------------------------------------

def test_tail_reads_the_end_of_a_big_file_only(tmp_path):
    big = tmp_path / "running.log"
    line = "step {:07d} loss 1.2345 — ok ✓\n"
    text = "".join(line.format(i) for i in range(160_000))
    big.write_text(text, encoding="utf-8")
    assert big.stat().st_size > 5_000_000
    tracemalloc.start()
    try:
        end = tail(big, 8000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000, f"tail used {peak} bytes for an 8000-byte tail"
    assert text.endswith(end)
    assert end.endswith(line.format(159_999))
    assert len(end.encode()) <= 8000 and len(end) > 7000 // len(line.format(0).encode()) * 10
    assert end.startswith("step "), "the cut first line (maybe mid-character) is dropped"
    assert "\ufffd" not in end

    small = tmp_path / "small.log"
    small.write_text("one\ntwo\n", encoding="utf-8")
    assert tail(small) == "one\ntwo\n"
    assert tail(tmp_path / "missing.log") == ""

def test_pid_alive_sees_dead_and_zombie_processes():
    assert not pid_alive(None) and not pid_alive(0)
    assert pid_alive(os.getpid())
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not pid_alive(done.pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, 30, "the child to exit")
    assert not pid_alive(zombie.pid)  # exited but not reaped: not alive
    zombie.wait()

def test_a_running_status_with_a_dead_pid_is_listed_as_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "crashed"
    run.mkdir()
    (run / "config.yaml").write_text("task: llm-sft\n", encoding="utf-8")
    write_status(run, "running", pid=dead.pid, step=3, total_steps=10, loss=1.5)
    rows = list_runs(tmp_path)
    assert [(r["run"], r["state"], r["step"], r["loss"]) for r in rows] == [(str(run), "failed", 3, 1.5)]
    assert Runner(tmp_path).active() is None  # nothing to re-attach to
    assert describe(None) == {}
    assert describe(run)["state"] == "failed" and describe(run)["checkpoint"] == ""

def test_start_refuses_bad_data_before_spawning(tiny_model_dir, tmp_path):
    runner = Runner(tmp_path / "runs")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(UserError, match="bad.jsonl"):
        runner.start(params(tiny_model_dir, bad, tmp_path / "runs" / "bad"))
    assert runner.proc is None and runner.active() is None
    assert not (tmp_path / "runs" / "bad" / "status.json").exists()
    assert runner.abort() is None  # nothing to stop


# -- real runs -------------------------------------------------------------------------------------

def test_start_runs_a_real_process_one_at_a_time_and_a_restarted_ui_reattaches(tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    data = write_alpaca(tmp_path / "train.jsonl")
    p = params(tiny_model_dir, data, root / "first")  # 6 records / batch 2 x 4 epochs = 12 steps
    runner = Runner(root)
    assert runner.active() is None

    run_dir = runner.start(p)
    assert run_dir == root / "first"
    assert runner.active() == run_dir
    pid = runner.proc.pid
    assert os.getpgid(pid) == pid != os.getpgid(0), "the run must lead its own process group"

    second = params(tiny_model_dir, data, root / "second")
    with pytest.raises(BusyError) as e:
        runner.start(second)
    assert str(run_dir) in str(e.value) and "already active" in str(e.value) and "abort" in str(e.value)
    assert not (root / "second").exists()  # refused before anything was written

    # a UI server restarted while the run goes on finds it through status.json's pid
    restarted = Runner(root)
    assert restarted.active() == run_dir, console(run_dir)
    assert read_status(run_dir)["pid"] == pid
    with pytest.raises(BusyError):
        restarted.start(second)

    # wait through the restarted runner only: the child exits unreaped (a zombie) and still
    # must not count as active
    wait_for(lambda: restarted.active() is None, 180, "the run to end")
    # the starting runner watches the process itself: it is done once the process has exited
    # (a moment after status.json says finished)
    wait_for(lambda: runner.active() is None, 30, "the process to exit")
    assert runner.proc is None  # reaped

    status = read_status(run_dir)
    assert status["state"] == "finished", (status, console(run_dir))
    assert (run_dir / "config.yaml").read_text(encoding="utf-8") == config_io.dumps(p)
    assert read_config(run_dir) == config_io.dumps(p)
    assert (run_dir / "adapter_model.safetensors").is_file()
    records, _ = read_log(run_dir / LOG_FILE)
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 12, records

    rows = {r["run"]: r for r in list_runs(root)}
    assert set(rows) == {str(run_dir)}
    row = rows[str(run_dir)]
    assert row["state"] == "finished" and row["step"] == 12 and row["total"] == 12
    assert row["loss"] == losses[-1]
    info = describe(run_dir)
    assert info["state"] == "finished" and Path(info["checkpoint"]).name == "checkpoint-12"
    assert run_summary(run_dir)["state"] == "finished"

    # the next run may start now
    runner2 = restarted.start(params(tiny_model_dir, data, root / "second", max_steps=1))
    wait_for(lambda: restarted.active() is None, 180, "the second run to end")
    assert read_status(runner2)["state"] == "finished", console(runner2)

def test_abort_stops_the_whole_group_with_a_checkpoint(tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    data = write_alpaca(tmp_path / "train.jsonl")
    p = params(tiny_model_dir, data, root / "long", max_steps=400, epochs=200, save_steps=5)
    runner = Runner(root)
    run_dir = runner.start(p)
    pgid = runner.proc.pid

    def logged():
        assert runner.active() == run_dir, ("the run ended early", console(run_dir))
        return len(read_log(run_dir / LOG_FILE)[0]) >= 3
    wait_for(logged, 180, "three log lines")
    assert group_members(pgid), "the run's process group should be alive"
    tree = {pgid} | {c.pid for c in psutil.Process(pgid).children(recursive=True)}

    grace = 45.0
    t0 = time.time()
    assert runner.abort(grace=grace) == run_dir
    wait_for(lambda: not group_members(pgid), grace, "the process group to exit after SIGTERM")
    with pytest.raises(ProcessLookupError):  # reaped too: nothing left of the group at all
        wait_for(lambda: os.killpg(pgid, 0) or False, 5, "the group to be reaped", interval=0.05)
    assert time.time() - t0 < grace
    assert live_processes(tree) == [], "no process of the run survives, in or out of its group"

    status = read_status(run_dir)
    assert status["state"] == "aborted", (status, console(run_dir))
    assert status["step"] < 400
    ckpt = last_checkpoint(run_dir)
    assert ckpt is not None, sorted(x.name for x in run_dir.iterdir())
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    assert 3 <= state["global_step"] < 400  # the stop saved the step it reached
    assert state["global_step"] == int(ckpt.name.split("-")[1]) == status["step"]
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    assert runner.active() is None
    assert [r["state"] for r in list_runs(root)] == ["aborted"]
    assert runner.abort() is None  # nothing left to stop
