"""Crashes lose nothing: real training processes on the tiny model are SIGKILLed at seeded random
moments (during start-up, between steps, in the middle of a checkpoint save) and resumed with
--resume-from-checkpoint auto; each resume must start from the newest complete checkpoint and
retrace the uninterrupted run step for step (same optimizer, scheduler, RNG and data position),
and the final weights must equal the uninterrupted run's. Out of memory and a full disk end
with a clear error and reason in status.json, and the previous checkpoint intact.

A process start that imports torch + transformers + trl costs ~15 s here, so the training
processes are forked from a multiprocessing forkserver that imported those modules once; each
is a separate process running core.run.main([config]), exactly what `python -m core.run` runs.
The last resume of the kill chain is a plain `python -m core.run` subprocess.
"""
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import checkpoints, config_io
from core.events import LOG_FILE, read_log, read_status
from core.params import LLMTrainingParams

from conftest import REPO, live_processes, write_alpaca

SEED = 20261123
TRIALS = 10
STEPS = 16  # 6 records / batch 2 = 3 steps per epoch: resumes land mid-epoch and on epoch ends
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json")


# -- the process harness ---------------------------------------------------------------------------

def _child(config: str, out: str, fsize: int = 0, memory_headroom: int = 0) -> None:
    """Runs in a process forked from the forkserver: core.run.main on one config, output to a
    file. fsize: a file size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes past it fail
    with EFBIG as on a full disk). memory_headroom: once the model and data are loaded, limit
    the address space to what is mapped now plus this many bytes (RLIMIT_AS), so the first
    training step really runs out of memory."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if memory_headroom:
        from core.events import RunLogCallback

        begin = RunLogCallback.on_train_begin

        def limited(self, *a, **kw):
            begin(self, *a, **kw)
            torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before the limit
            mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                          if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_headroom, resource.RLIM_INFINITY))

        RunLogCallback.on_train_begin = limited
    from core.run import main

    sys.exit(main([config]))


# One thread per process: the tiny model gains nothing from more, the machine is shared, and every
# process of a comparison must reduce in the same order to give bit-equal weights.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def forkserver():
    old = {k: os.environ.get(k) for k in THREADS}
    os.environ.update(THREADS)  # the forkserver and its children start with these
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["core.run", "core.stages", "core.stages.sft", "core.data.loader",
                                "core.model.loader", "core.model.adapters", "transformers.trainer", "trl", "peft"])
    ctx.Process(target=len, args=((),)).start()  # start the forkserver now, with these settings
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return ctx


def start(ctx, config: Path, out: Path, **kw):
    proc = ctx.Process(target=_child, args=(str(config), str(out)), kwargs=kw)
    proc.start()
    return proc


def make_config(tiny_model_dir, data: Path, run_dir: Path, **kw) -> Path:
    base = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(run_dir), trainer="sft",
                chat_template="chatml", finetuning_type="lora", lora_dropout=0.1, max_steps=STEPS,
                batch_size=2, gradient_accumulation=1, lr=1e-2, warmup_ratio=0.1, scheduler="cosine",
                logging_steps=1, log="none", eval_strategy="no", save_strategy="steps", save_steps=2,
                save_total_limit=2, merge_adapter=False, resume_from_checkpoint="auto")
    base.update(kw)
    run_dir.mkdir(parents=True, exist_ok=True)
    return config_io.save(LLMTrainingParams(**base), run_dir / "config.yaml")


def complete_steps(run_dir: Path) -> list[int]:
    """Checkpoints with every file and a readable trainer_state.json (the test's own judgement)."""
    steps = []
    for d in run_dir.glob("checkpoint-*"):
        try:
            state = json.loads((d / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if all((d / f).is_file() for f in CHECKPOINT_FILES) and state["global_step"] == int(d.name.split("-")[1]):
            steps.append(state["global_step"])
    return sorted(steps)


def all_checkpoints(run_dir: Path) -> list[str]:
    return sorted(d.name for d in run_dir.glob("checkpoint-*"))


def fresh_status(run_dir: Path, pid: int) -> dict:
    """status.json once this process has reached training (its own pid, a step of its own)."""
    s = read_status(run_dir)
    return s if s.get("pid") == pid and s.get("step") is not None else {}


def kill_mid_save(run_dir: Path, proc) -> bool:
    """Stop the process the moment a checkpoint directory exists that is not complete yet, and
    SIGKILL it there. Returns False if the run ended first."""
    while proc.is_alive() and not fresh_status(run_dir, proc.pid):  # its start-up clean-up is done
        time.sleep(0.005)
    while proc.is_alive():
        partial = [d for d in all_checkpoints(run_dir) if int(d.split("-")[1]) not in complete_steps(run_dir)]
        if partial:
            os.kill(proc.pid, signal.SIGSTOP)
            still = [d for d in all_checkpoints(run_dir) if int(d.split("-")[1]) not in complete_steps(run_dir)]
            if still:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                return True
            os.kill(proc.pid, signal.SIGCONT)  # it finished while we looked: catch the next one
        time.sleep(0.001)
    return False


def kill_at_step(run_dir: Path, proc, step: int, delay: float) -> None:
    while proc.is_alive() and (fresh_status(run_dir, proc.pid).get("step") or 0) < step:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def kill_during_startup(run_dir: Path, proc, delay: float) -> None:
    """Kill `delay` seconds after core.run.train began (loading the model and data, resuming)."""
    while proc.is_alive() and read_status(run_dir).get("pid") != proc.pid:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def resumed_from(run_dir: Path, offset: int):
    """What this process said about resuming, from the running.log it appended after offset:
    ('ckpt', name) / ('fresh', None) / None if killed before it got there."""
    text = (run_dir / "running.log").read_text(encoding="utf-8", errors="replace")[offset:]
    for line in text.splitlines():
        if "resuming from " in line:
            return "ckpt", Path(line.split("resuming from ", 1)[1].strip()).name
        if "no complete checkpoint" in line:
            return "fresh", None
    return None


def log_size(run_dir: Path) -> int:
    try:
        return (run_dir / "running.log").stat().st_size
    except FileNotFoundError:
        return 0


def losses(run_dir: Path) -> dict[int, dict]:
    records, _ = read_log(run_dir / LOG_FILE)
    steps = [r["step"] for r in records if r.get("loss") is not None]
    assert steps == sorted(set(steps)), f"the log repeats or reorders steps: {steps}"
    return {r["step"]: r for r in records if r.get("loss") is not None}


def assert_same_curve(got: dict[int, dict], ref: dict[int, dict]) -> None:
    for step, r in got.items():
        assert r["loss"] == pytest.approx(ref[step]["loss"], abs=2e-4), (step, r, ref[step])
        assert r["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4, abs=1e-6), (step, r, ref[step])
        assert r["lr"] == pytest.approx(ref[step]["lr"], rel=1e-6), (step, r, ref[step])


# -- the pieces, on hand-made directories --------------------------------------------------------------

def test_partial_checkpoints_and_leftovers_are_found_and_removed(tmp_path):
    run = tmp_path / "run"
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)):
        d = run / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "optimizer.pt").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    (run / ".status.json.abc.tmp").write_text("{")
    (run / ".trash-checkpoint-0-1-2").mkdir()
    (run / "notes.txt").write_text("mine")
    assert [p.name for p in checkpoints.complete(run)] == ["checkpoint-2", "checkpoint-4"]
    assert checkpoints.last_complete(run).name == "checkpoint-4"
    removed = checkpoints.clean(run)
    assert sorted(removed) == [".status.json.abc.tmp", ".trash-checkpoint-0-1-2", "checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "notes.txt"]
    checkpoints.remove(run / "checkpoint-2")
    checkpoints.remove(run / "checkpoint-2")  # already gone: nothing to do
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "notes.txt"]


def test_repair_log_drops_a_torn_line_and_the_steps_after_the_checkpoint(tmp_path):
    log = tmp_path / LOG_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo', encoding="utf-8")
    assert checkpoints.repair_log(log, upto_step=4) == 2
    assert log.read_text(encoding="utf-8") == "\n".join(lines[:4]) + "\n"
    inode = log.stat().st_ino
    assert checkpoints.repair_log(log, upto_step=4) == 0 and log.stat().st_ino == inode, "untouched if sound"
    assert checkpoints.repair_log(tmp_path / "missing.jsonl") == 0


# -- the kill chain --------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_auto_matches_an_uninterrupted_run(
        forkserver, tiny_model_dir, tmp_path):
    t0 = time.time()
    data = write_alpaca(tmp_path / "train.jsonl")
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref_cfg = make_config(tiny_model_dir, data, ref_dir, resume_from_checkpoint=None)
    cfg = make_config(tiny_model_dir, data, run_dir)

    ref = start(forkserver, ref_cfg, tmp_path / "reference.out")
    ref.join(240)
    assert ref.exitcode == 0, (tmp_path / "reference.out").read_text()[-3000:]
    ref_curve = losses(ref_dir)
    assert sorted(ref_curve) == list(range(1, STEPS + 1))

    rng = random.Random(SEED)
    kinds = ["save"] * 3 + ["startup"] * 2 + ["step"] * 5
    rng.shuffle(kinds)
    expected = None  # the checkpoint the next process must resume from (None: step 0)
    outcomes = []
    for i, kind in enumerate(kinds):
        before = complete_steps(run_dir)
        offset = log_size(run_dir)
        out = tmp_path / f"trial-{i}.out"
        proc = start(forkserver, cfg, out)
        if kind == "save":
            hit = kill_mid_save(run_dir, proc)
            assert hit, f"trial {i}: the run ended before a save could be caught\n{out.read_text()[-2000:]}"
        elif kind == "startup":
            kill_during_startup(run_dir, proc, rng.uniform(0.0, 0.5))
        else:  # stay well before the last step: a fast machine does a step in ~0.05 s
            target = min((before[-1] if before else 0) + rng.randint(1, 5), STEPS - 6)
            kill_at_step(run_dir, proc, target, rng.uniform(0.0, 0.15))
        assert proc.exitcode == -signal.SIGKILL, (i, kind, proc.exitcode, out.read_text()[-3000:])

        said = resumed_from(run_dir, offset)  # this process's resume, if it got that far
        if said is not None:
            assert said == (("ckpt", f"checkpoint-{expected}") if expected else ("fresh", None)), (i, said)
        got = losses(run_dir)
        assert_same_curve(got, ref_curve)  # every step logged so far retraces the reference
        after = complete_steps(run_dir)
        partial = sorted(set(all_checkpoints(run_dir)) - {f"checkpoint-{s}" for s in after})
        if kind == "save":
            assert partial, f"trial {i}: killed mid-save but no partial checkpoint left"
        torn = i % 3 == 1 and bool(got)
        if torn:  # as if killed in the middle of appending a log line
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as f:
                f.write('{"step": %d, "loss": 1.2' % (max(got) + 1))
        expected = after[-1] if after else None
        outcomes.append({"trial": i, "kind": kind, "resumed": said, "last_step_logged": max(got, default=0),
                         "complete": after, "partial": partial, "torn_log_line": torn})

    # the last resume: a plain `python -m core.run` to the end
    offset = log_size(run_dir)
    done = subprocess.run([sys.executable, "-m", "core.run", str(cfg)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **THREADS, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    said = resumed_from(run_dir, offset)
    assert said == (("ckpt", f"checkpoint-{expected}") if expected else ("fresh", None)), said
    status = read_status(run_dir)
    assert status["state"] == "finished" and status["step"] == STEPS, status

    final = losses(run_dir)
    assert sorted(final) == list(range(1, STEPS + 1)), "the curve has every step exactly once"
    assert_same_curve(final, ref_curve)
    a = load_file(str(run_dir / "adapter_model.safetensors"))
    b = load_file(str(ref_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, f"final weights differ from the uninterrupted run by {diff}"
    assert all_checkpoints(run_dir) == [f"checkpoint-{s}" for s in complete_steps(run_dir)] == \
        [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"], "complete or absent, and --save-total-limit 2 kept"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "no temp files left"

    resumes = [o for o in outcomes if o["resumed"] is not None] + [{"resumed": said}]
    mid_save = sum(o["kind"] == "save" for o in outcomes)
    summary = (f"kill trials: {len(outcomes)} SIGKILLs ({mid_save} mid-save, "
               f"{sum(o['kind'] == 'startup' for o in outcomes)} during start-up, "
               f"{sum(o['kind'] == 'step' for o in outcomes)} between steps; "
               f"{sum(o['torn_log_line'] for o in outcomes)} torn log lines); resumes checked in running.log: "
               f"{len(resumes)}, all from the newest complete checkpoint; every logged step equal to the "
               f"uninterrupted run; final weights max |diff| {diff:.1e}; {time.time() - t0:.0f} s")
    print("\n" + summary)
    for o in outcomes:
        print("  ", o)


# -- out of memory, disk full ----------------------------------------------------------------------

def test_out_of_memory_is_reported_with_fixes_and_status_says_oom(forkserver, tiny_model_dir, tmp_path):
    # 256 records of ~400 tokens in one batch: attention scores alone need ~1 GiB; the process
    # gets 256 MiB on top of what it has mapped once the model and data are loaded
    rows = [json.dumps({"instruction": f"Repeat {i}.", "input": "", "output": "la " * 400}) for i in range(256)]
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    run_dir = tmp_path / "oom"
    cfg = make_config(tiny_model_dir, data, run_dir, batch_size=256, block_size=512, max_steps=1,
                      resume_from_checkpoint=None)
    out = tmp_path / "oom.out"
    proc = start(forkserver, cfg, out, memory_headroom=256 * 2**20)
    proc.join(240)
    console = out.read_text(encoding="utf-8", errors="replace")
    assert proc.exitcode == 1, console[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["reason"] == "oom", status
    message = status["error"]
    for words in ("out of memory", "--batch-size (now 256", "--gradient-accumulation", "gradient checkpointing",
                  "--quantization int4", "GiB", "activations"):
        assert words in message, (words, message)
    assert message in console, "the console says the same as status.json"
    assert "Traceback" not in console, console[-3000:]
    assert "Traceback" in (run_dir / "running.log").read_text(), "the details stay in running.log"


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs to fill up (needs root or CAP_SYS_ADMIN, else the test is skipped)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def shrink(mnt: Path, room: int) -> None:
    """Remount the tmpfs so that only `room` more bytes fit."""
    st = os.statvfs(mnt)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={(used + room) // 1024}k", str(mnt)], check=True)


@pytest.mark.parametrize("limit", ["file-size-limit", "full-tmpfs"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(limit, forkserver, tiny_model_dir, tmp_path, request):
    data = write_alpaca(tmp_path / "train.jsonl")
    run_dir = (request.getfixturevalue("small_disk") if limit == "full-tmpfs" else tmp_path) / "full"
    cfg = make_config(tiny_model_dir, data, run_dir, max_steps=2)
    first = start(forkserver, cfg, tmp_path / "first.out")
    first.join(240)
    assert first.exitcode == 0, (tmp_path / "first.out").read_text()[-3000:]
    ckpt = run_dir / "checkpoint-2"
    before = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    optimizer_size = (ckpt / "optimizer.pt").stat().st_size

    # continue to step 4 with files limited below the optimizer state's size: saving checkpoint-4
    # fails exactly as on a full disk (EFBIG instead of ENOSPC)
    make_config(tiny_model_dir, data, run_dir, max_steps=4)
    out = tmp_path / "second.out"
    if limit == "full-tmpfs":  # room for the logs of two steps, not for a checkpoint: ENOSPC
        shrink(run_dir.parent, 200_000)
        proc = start(forkserver, cfg, out)
    else:
        proc = start(forkserver, cfg, out, fsize=optimizer_size // 2)
    proc.join(240)
    console = out.read_text(encoding="utf-8", errors="replace")
    assert proc.exitcode == 1, console[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["reason"] == "disk_full", status
    message = status["error"]
    for words in ("disk full", "checkpoint-2, is intact", "--resume-from-checkpoint auto", "free disk space"):
        assert words in message, (words, message)
    assert "Traceback" not in console and message in console, console[-3000:]
    print(f"\n{limit}: {message}")
    assert all_checkpoints(run_dir) == ["checkpoint-2"], "the partial checkpoint-4 is removed"
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before, "checkpoint-2 untouched"
    assert complete_steps(run_dir) == [2]
    load_file(str(ckpt / "adapter_model.safetensors"))
    assert torch.load(ckpt / "optimizer.pt", weights_only=True)["state"], "the optimizer state loads"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "no temp files left"

    # with room again, the run continues from checkpoint-2
    if limit == "full-tmpfs":
        shrink(run_dir.parent, 16 * 2**20)
    again = start(forkserver, cfg, tmp_path / "third.out")
    again.join(240)
    assert again.exitcode == 0, (tmp_path / "third.out").read_text()[-3000:]
    assert read_status(run_dir)["state"] == "finished" and complete_steps(run_dir) == [2, 4]
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


# -- Ctrl+C in the CLI -----------------------------------------------------------------------------

def descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.slow
def test_ctrl_c_in_the_cli_saves_a_checkpoint_and_leaves_no_process(tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "train.jsonl")
    run_dir = tmp_path / "cli"
    argv = [sys.executable, "-m", "core.cli", "llm", "--train", "--model", str(tiny_model_dir),
            "--data-path", str(data), "--project-name", str(run_dir), "--chat-template", "chatml", "--peft",
            "--max-steps", "2000", "--batch-size", "2", "--save-steps", "500", "--logging-steps", "1",
            "--log", "none", "--lr", "1e-3"]
    # its own session, as a terminal's foreground job: Ctrl+C is SIGINT to the whole group
    cli = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **THREADS, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while len(read_log(run_dir / LOG_FILE)[0]) < 3:
        assert cli.poll() is None and time.time() < deadline, cli.communicate()[0][-3000:]
        time.sleep(0.1)
    tree = descendants(cli.pid) | {cli.pid}
    assert len(tree) >= 2, "the CLI trains in a child process"
    t0 = time.time()
    os.killpg(cli.pid, signal.SIGINT)
    output, _ = cli.communicate(timeout=90)
    took = time.time() - t0
    assert cli.returncode == 0, output[-3000:]
    assert "saving a checkpoint" in output
    status = read_status(run_dir)
    assert status["state"] == "aborted", status
    stopped = status["step"]
    assert 3 <= stopped < 2000
    assert complete_steps(run_dir) == [stopped], "the stop saved the step it reached"
    assert live_processes(tree) == [], "no process of the run survives"
    with pytest.raises(ProcessLookupError):
        os.killpg(cli.pid, 0)
    print(f"\nCtrl+C: stopped at step {stopped}, checkpoint saved and every process gone in {took:.1f} s")


def test_a_stop_during_start_up_is_an_abort_not_a_kill(tiny_model_dir, tmp_path):
    """SIGTERM while `python -m core.run` still imports its libraries (the web UI's Abort right
    after Start): the process notes it, stops at its first step with a checkpoint and reports
    `aborted`, instead of dying of the default SIGTERM action with no status."""
    config = make_config(tiny_model_dir, write_alpaca(tmp_path / "t.jsonl"), tmp_path / "run", max_steps=50)
    proc = subprocess.Popen([sys.executable, "-m", "core.run", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # well before torch and transformers have imported
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    status = read_status(tmp_path / "run")
    assert status["state"] == "aborted", status
    assert checkpoints.last_complete(tmp_path / "run") is not None
