"""The training process: `python -m core.run <config.yaml>`.

Reads the run file, runs its stage, and keeps the run directory truthful: config.yaml (what
reproduces the run), running.log, status.json (pending/running/finished/failed/aborted with the
error), trainer_log.jsonl, loss.png, checkpoints and the trained model. SIGTERM and Ctrl+C save a
checkpoint, then stop with status aborted.

Under a distributed launcher every rank runs this module; only global rank 0 writes the run
directory (the other ranks log to the console with their rank), and a stop request reaching any
rank stops all of them at the same step.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

# A stop (the web UI's Abort, Ctrl+C) can arrive while the libraries below still import: note
# it instead of dying of the default SIGTERM action; train() turns it into a normal stop.
_EARLY_STOP: list[int] = []
if __name__ == "__main__":
    for _s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_s, lambda signum, frame: _EARLY_STOP.append(signum))

from core import checkpoints, config_io  # noqa: E402
from core.errors import UserError
from core.events import STOP, is_main_process, rank, write_status
from core.params import LLMTrainingParams
from core.redaction import RedactingFormatter, RedactingStream, register

log = logging.getLogger("aitraining")
FILE_ONLY = {"file_only": True}  # logging extra: running.log only (tracebacks), not the console


def _setup_logging(run_dir: Path, console: bool = True) -> list[tuple[logging.Logger, logging.Handler]]:
    fmt = RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handler = None
    if is_main_process():
        handler = logging.FileHandler(run_dir / "running.log", encoding="utf-8")
        handler.setFormatter(fmt)
    console_handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank()}] " if "WORLD_SIZE" in os.environ else ""
    console_handler.setFormatter(RedactingFormatter(prefix + "%(levelname)s %(message)s"))
    console_handler.addFilter(lambda record: not getattr(record, "file_only", False))
    added = []
    for name in ("aitraining", "transformers", "peft", "trl", "datasets", "accelerate"):
        lg = logging.getLogger(name)
        if handler is not None:
            lg.addHandler(handler)
            added.append((lg, handler))
        if name == "aitraining":
            lg.setLevel(logging.INFO)
            lg.propagate = False
            if console:
                lg.addHandler(console_handler)
                added.append((lg, console_handler))
    return added


_first_signal = 0.0
SIGNAL_REPEAT_S = 3.0  # a process-group signal and the launcher's forwarded copy are one request


def _on_stop_signal(signum, frame):
    global _first_signal
    if STOP.is_set() and time.time() - _first_signal > SIGNAL_REPEAT_S:  # a later signal: the user insists
        raise KeyboardInterrupt
    if STOP.is_set():
        return
    _first_signal = time.time()
    STOP.set()
    log.warning("stop requested (%s): saving a checkpoint, then stopping", signal.Signals(signum).name)


def train(params: LLMTrainingParams, run_dir: str | os.PathLike, *, console: bool = True) -> int:
    """Run one training job in this process; returns the exit code (0 finished or aborted).
    console=False: a sweep trial inside a run whose own handlers already print to the console."""
    from core.stages import STAGES

    run_dir = Path(run_dir)
    register(params.token)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    if not config_path.exists() and is_main_process():
        config_io.save(params, config_path)
    handlers = _setup_logging(run_dir, console)
    if is_main_process():  # one process of a distributed run tidies up and records the environment
        checkpoints.clean(run_dir)  # partial checkpoints and temp files of a killed earlier process
        _write_environment(run_dir)
    STOP.clear()
    previous = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    if _EARLY_STOP:  # asked to stop while starting: stop at the first step, with a checkpoint
        _on_stop_signal(_EARLY_STOP[0], None)
    # step None until the trainer says where it starts (a resumed run: its checkpoint's step)
    write_status(run_dir, "running", started=time.time(), pid=os.getpid(), pgid=os.getpgid(0),
                 stage=params.stage, error=None, reason=None, step=None)
    try:
        log.info("run %s: trainer %s, model %s, data %s", run_dir, params.trainer, params.model, params.data_path)
        log.info("memory allocator: %s", _allocator())
        if params.use_sweep:
            from core.sweep import run_sweep

            metrics = run_sweep(params, run_dir)
        else:
            metrics = STAGES[params.stage].runner()(params, run_dir)
    except UserError as e:
        log.error("%s", e)
        write_status(run_dir, "failed", reason="input", error=str(e))
        return e.exit_code
    except KeyboardInterrupt:
        write_status(run_dir, "aborted", reason="interrupted",
                     error="interrupted twice: stopped without a final checkpoint")
        return 130
    except Exception as e:  # a bug or an environment failure: full traceback in running.log
        if is_oom(e):
            message = oom_message(e, params)
            log.error("%s", message)
            log.error("details:\n%s", traceback.format_exc(), extra=FILE_ONLY)
            write_status(run_dir, "failed", reason="oom", error=message)
            return 1
        if disk_full(e, run_dir):
            checkpoints.clean(run_dir)  # the checkpoint being written is partial: remove it
            message = disk_full_message(e, run_dir)
            log.error("%s", message)
            log.error("details:\n%s", traceback.format_exc(), extra=FILE_ONLY)
            write_status(run_dir, "failed", reason="disk_full", error=message)
            return 1
        log.error("training failed%s: %s: %s\n%s", f" on rank {rank()}" if rank() else "", type(e).__name__, e,
                  traceback.format_exc())
        write_status(run_dir, "failed", reason="error", error=f"{type(e).__name__}: {e} (details in running.log)")
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for logger, h in handlers:
            logger.removeHandler(h)
            h.close()
    state = "aborted" if STOP.is_set() else "finished"
    clean = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}
    write_status(run_dir, state, finished=time.time(), metrics=clean)
    log.info("run %s: %s", state, run_dir)
    if state == "finished" and params.push_to_hub:
        return push_run(params, run_dir)
    return 0


# What a pushed run leaves out: checkpoints (optimizer state), the process log and status.
PUSH_IGNORE = ["checkpoint-*", "running.log", "status.json", "*.tmp", ".*"]


def push_run(params: LLMTrainingParams, run_dir: Path) -> int:
    """Upload the finished run (adapter, merged model, tokenizer, config.yaml, curves) to the private
    repo {username}/{project-name}, with a model card. Returns 0, or 2 when the push failed (the
    trained model stays in the run directory; status.json says why)."""
    from core.model import hub

    repo_id = hub.repo_id_for(params.username, params.project_name)
    token = params.token.get_secret_value() if params.token is not None else None
    card = hub.model_card(repo_id, base_model=params.model, trainer=params.trainer,
                          method=params.finetuning_type, chat_template=params.chat_template)
    try:
        url = hub.push_folder(run_dir, repo_id, token=token, private=True, card=card,
                              ignore_patterns=PUSH_IGNORE)
    except UserError as e:
        log.error("%s", e)  # push_folder has already scrubbed the token from the message
        write_status(run_dir, "finished", push_error=str(e))
        return e.exit_code
    write_status(run_dir, "finished", pushed_to=url)
    log.info("pushed to %s", url)
    return 0


# -- failures people can fix ------------------------------------------------------------------

def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def is_oom(e: BaseException) -> bool:
    """Out of memory on any device: torch.OutOfMemoryError (CUDA/MPS), MemoryError, or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    import torch

    for x in _chain(e):
        if isinstance(x, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
            return True
        text = str(x).lower()
        if isinstance(x, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text):
            return True
    return False


def _allocator() -> str:
    """jemalloc when core.launch preloaded it into this process, else the C library's malloc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    if "libjemalloc" in maps:
        return "jemalloc"
    from core.launch import jemalloc_path

    hint = "" if jemalloc_path() else "; on a CPU, apt-get install libjemalloc2 lowers the peak memory"
    return f"system (the C library's malloc{hint})"


def memory_estimate(params: LLMTrainingParams) -> str:
    """The pre-run estimate (core/model/memory.py) for the OOM message, against free memory now."""
    try:
        from core.model import memory

        return memory.estimate(params, config=memory.config_if_local(params.model, params.trust_remote_code)).summary()
    except Exception as err:  # the estimate must never hide the real error
        return f"(no memory estimate: {err})"


def oom_message(e: BaseException, params: LLMTrainingParams) -> str:
    import torch

    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    fixes = [f"a smaller --batch-size (now {params.batch_size}; raise --gradient-accumulation to keep "
             "the effective batch)"]
    if params.block_size <= 0 or params.block_size > 512:
        fixes.append("a shorter --block-size")
    if not torch.cuda.is_available():
        fixes.append("a GPU, where gradient checkpointing is on by default (this CPU run trains without it)")
    elif params.disable_gradient_checkpointing:
        fixes.append("gradient checkpointing: drop --disable-gradient-checkpointing")
    if not params.quantization:
        fixes.append("QLoRA: --peft --quantization int4")
    elif params.finetuning_type == "full":
        fixes.append("--peft (LoRA) instead of full fine-tuning")
    return (f"out of memory: {first}. The run did not fit in memory. Fix: " + "; or ".join(fixes) +
            f". {memory_estimate(params)}")


def disk_full(e: BaseException, run_dir: Path) -> bool:
    """A write failed for lack of space (ENOSPC), quota (EDQUOT) or a file size limit (EFBIG).
    Some writers (torch.save) drop the errno, so a failed write is checked with a 1 MiB probe."""
    import errno as E

    codes = {E.ENOSPC, E.EFBIG, E.EDQUOT}
    # torch.save reports a short write as "file write failed" or "unexpected pos N vs M"
    words = ("no space left", "file too large", "quota exceeded", "os error 28", "os error 27",
             "file write failed", "unexpected pos", "inline_container")
    suspect = False
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in codes:
            return True
        text = str(x).lower()
        suspect = suspect or any(w in text for w in words)
    if not suspect:
        return False
    probe = run_dir / f".disk-probe-{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 2**20)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as err:
        return err.errno in codes
    finally:
        probe.unlink(missing_ok=True)


def disk_full_message(e: BaseException, run_dir: Path) -> str:
    import shutil

    last = checkpoints.last_complete(run_dir)
    import resource

    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if fsize != resource.RLIM_INFINITY:
        free += f", files limited to {fsize} bytes (ulimit -f)"
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    kept = (f"The last complete checkpoint, {last.name}, is intact; after freeing space, "
            f"--resume-from-checkpoint auto continues from it." if last else
            "No complete checkpoint was saved yet.")
    return (f"disk full while writing to {run_dir} ({free}; {first}). A partly written checkpoint "
            f"was removed. {kept} Fix: free disk space, or raise the file size limit (ulimit -f), or point "
            "--project-name at a disk with room; --save-total-limit 1 keeps fewer checkpoints.")


def _write_environment(run_dir: Path) -> None:
    """accelerate env into the run directory: what a bug report about this run needs."""
    from core.config_io import atomic_write
    from core.launch import ACCELERATE_ENV, accelerate_env

    try:
        world = os.environ.get("WORLD_SIZE", "1")
        atomic_write(run_dir / ACCELERATE_ENV, f"processes: {world}\n" + accelerate_env() + "\n")
    except Exception as e:  # never fail a run over its diagnostics
        log.warning("could not record accelerate env: %s", e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # everything this process prints lands in the run's console.log: no token in clear there
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    if len(argv) != 1:
        print("usage: python -m core.run <config.yaml>", file=sys.stderr)
        return 2
    try:
        params = config_io.load(argv[0])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    run_dir = Path(params.project_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if Path(argv[0]).resolve() != (run_dir / "config.yaml").resolve() and is_main_process():
        config_io.save(params, run_dir / "config.yaml")
    try:
        return train(params, run_dir)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: left to exit-time destructors, a
    rank's communication threads can be destroyed while still joinable ("terminate called without
    an active exception", SIGABRT), which fails a run that trained and saved."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as err:  # a finished run must not fail on its way out
        log.warning("closing the process group: %s", err)


if __name__ == "__main__":
    sys.exit(main())
