"""How a run is started: the command line and environment for `python -m core.run <yaml>`.

One device: one process, `python -m core.run <yaml>`. Several (GPUs, or --num-processes on a
CPU, which trains over gloo): Accelerate's launcher starts one `core.run` per device and supervises
them, so a rank that dies takes the others down with it:

    ddp        accelerate launch --multi_gpu --num_processes N ... -m core.run <yaml>
    deepspeed  accelerate launch --use_deepspeed --deepspeed_config_file <run>/deepspeed_config.json
    fsdp       accelerate launch --use_fsdp --fsdp_version 2 ...

The CLI, the Python API and the web UI all start runs through prepare(); never a shell: the
command is an argv list.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

from core.params import LLMTrainingParams

# After a stop request (Ctrl+C, the web UI's abort) a run gets this long to save a checkpoint
# and exit before it is killed. Env AITRAINING_STOP_GRACE_S overrides it.
STOP_GRACE_S = float(os.environ.get("AITRAINING_STOP_GRACE_S", 60))

DEEPSPEED_CONFIG = "deepspeed_config.json"
ACCELERATE_ENV = "accelerate_env.txt"
LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch`, same interpreter


def visible_gpus(params: LLMTrainingParams) -> int:
    """GPUs this run may use: --devices when given, else what CUDA_VISIBLE_DEVICES lets torch see."""
    if params.devices:
        return len([d for d in params.devices.split(",") if d.strip()])
    import torch

    return torch.cuda.device_count()


def process_count(params: LLMTrainingParams, gpus: int) -> int:
    """Processes in all (over every machine): --num-processes, else one per GPU on each machine."""
    if params.num_processes:
        return params.num_processes
    return max(gpus, 1) * params.num_machines


def uses_launcher(params: LLMTrainingParams, gpus: int) -> bool:
    """Accelerate's launcher is needed for several processes or machines, and for DeepSpeed/FSDP."""
    return (process_count(params, gpus) > 1 or params.num_machines > 1
            or params.distributed_backend in ("deepspeed", "fsdp"))


def build_command(params: LLMTrainingParams, config_path: str | os.PathLike,
                  gpus: Optional[int] = None) -> list[str]:
    """argv that trains the run described by config_path; gpus: the visible device count
    (detected when None; tests pass it, so every layout is checkable without GPUs)."""
    gpus = visible_gpus(params) if gpus is None else gpus
    config = str(Path(config_path).resolve())
    if not uses_launcher(params, gpus):
        return [sys.executable, "-m", "core.run", config]
    n = process_count(params, gpus)
    cmd = list(LAUNCHER)
    backend = params.distributed_backend or "ddp"
    if backend == "deepspeed":
        cmd += ["--use_deepspeed", "--deepspeed_config_file",
                str(Path(config).parent / DEEPSPEED_CONFIG)]
        if params.deepspeed_stage == 3:
            cmd += ["--zero3_init_flag", "true"]
        if params.num_machines > 1:
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    elif backend == "fsdp":
        cmd += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true"]
    else:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(n), "--num_machines", str(params.num_machines)]
    if params.num_machines > 1:
        cmd += ["--machine_rank", str(params.machine_rank), "--main_process_ip", params.main_process_ip]
    # Port 0 lets accelerate pick a free one: two runs on one machine do not collide. Several
    # machines must agree on it, so there the default is accelerate's 29500.
    port = params.main_process_port
    if port is None:
        port = 0 if params.num_machines == 1 else 29500
    cmd += ["--main_process_port", str(port)]
    if gpus == 0:
        # No GPU: ranks talk over gloo (accelerate's --cpu with several processes does not start).
        cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n))]
    return cmd + ["-m", "core.run", config]


def deepspeed_config(params: LLMTrainingParams) -> dict:
    """The ZeRO config written next to config.yaml. "auto" values are filled by transformers from
    the run's TrainingArguments, so the two cannot disagree."""
    zero: dict = {
        "stage": params.deepspeed_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if params.deepspeed_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            # gather the shards into one 16-bit state dict when the model is saved
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    else:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 2e8, "reduce_scatter": True})
    offload = params.deepspeed_offload
    if offload:
        target = {"device": offload, "pin_memory": True}
        if offload == "nvme":
            target["nvme_path"] = str(Path(params.deepspeed_nvme_path).resolve())
        zero["offload_optimizer"] = dict(target)
        if params.deepspeed_stage == 3:
            zero["offload_param"] = dict(target)
    mp = params.mixed_precision
    return {
        "bf16": {"enabled": "auto" if mp is None else mp == "bf16"},
        "fp16": {"enabled": "auto" if mp is None else mp == "fp16",
                 "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1_000_000,  # our own log has the numbers; keep DeepSpeed's console quiet
        "wall_clock_breakdown": False,
    }


def require_deepspeed() -> None:
    import importlib.util

    from core.errors import ConfigError

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("--distributed-backend deepspeed needs DeepSpeed, which is not installed. Fix: "
                          "pip install deepspeed (or pip install -e \".[deepspeed]\"), or use "
                          "--distributed-backend ddp / fsdp")


def build_env(params: LLMTrainingParams, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the run: secrets travel here, never through the YAML."""
    env = dict(os.environ if base is None else base)
    from core import ROOT

    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if params.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(d.strip() for d in params.devices.split(",") if d.strip())
    if params.token is not None:
        env["HF_TOKEN"] = params.token.get_secret_value()
    return env


# CPU training allocates and frees activation tensors of many sizes every step. glibc's malloc
# raises its mmap threshold after the first big free and then fragments its heap, so a run's
# resident memory grows well past what is live; jemalloc's size classes reuse freed memory. With
# decay off, freed pages stay mapped for the next step instead of being returned and faulted in
# again (a training process needs them back within seconds). Figures: bench/allocator.py.
# AITRAINING_ALLOCATOR=system keeps glibc; a MALLOC_CONF of your own wins.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib", "/opt/homebrew/lib")


def jemalloc_path() -> Optional[str]:
    for d in JEMALLOC_DIRS:
        path = Path(d) / "libjemalloc.so.2"
        if path.is_file():
            return str(path)
    return None


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """env with jemalloc preloaded for a CPU run, when it is installed and nothing else is
    preloaded (a user's LD_PRELOAD or AITRAINING_ALLOCATOR=system wins)."""
    choice = env.get("AITRAINING_ALLOCATOR", "jemalloc").strip().lower()
    if choice not in ("jemalloc", "system"):
        from core.errors import ConfigError

        raise ConfigError(f"AITRAINING_ALLOCATOR={choice!r} is not an allocator this knows. Fix: set it to "
                          "jemalloc (the default for CPU runs) or system (the C library's malloc), or unset it")
    lib = jemalloc_path()
    if lib and not env.get("LD_PRELOAD") and choice == "jemalloc":
        env = {**env, "LD_PRELOAD": lib}
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def prepare(params: LLMTrainingParams, config_path: str | os.PathLike,
            base_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for a run, with the files the launcher reads written into the run directory."""
    from core.config_io import atomic_write

    from core.errors import ConfigError

    gpus = visible_gpus(params)
    per_machine = -(-process_count(params, gpus) // params.num_machines)
    if gpus and per_machine > gpus:
        raise ConfigError(f"--num-processes {params.num_processes} needs {per_machine} GPUs on each machine, but "
                          f"{gpus} are visible (--devices / CUDA_VISIBLE_DEVICES); lower --num-processes")
    cmd = build_command(params, config_path, gpus=gpus)
    if params.distributed_backend == "deepspeed":
        require_deepspeed()
        atomic_write(Path(config_path).parent / DEEPSPEED_CONFIG, json.dumps(deepspeed_config(params), indent=2))
    env = build_env(params, base_env)
    if is_multi_process(cmd) and gpus == 0 and params.distributed_backend != "deepspeed":
        # Without it every CPU rank would train alone on all the data (accelerate's state only
        # takes the gloo path when told it is on a CPU). DeepSpeed picks gloo by itself.
        env["ACCELERATE_USE_CPU"] = "true"
    if gpus == 0:
        env = allocator_env(env)
    return cmd, env


def is_multi_process(cmd: list[str]) -> bool:
    return cmd[: len(LAUNCHER)] == LAUNCHER


# -- the environment report (`aitraining env`, <run>/accelerate_env.txt) ---------------------------
def accelerate_env() -> str:
    """What `accelerate env` prints (versions, platform, devices, accelerate's default config)."""
    import argparse
    import contextlib
    import io

    from accelerate.commands.env import env_command

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        env_command(argparse.Namespace(config_file=None))
    return out.getvalue().replace("Copy-and-paste the text below in your GitHub issue", "").strip()


def env_report() -> str:
    """`aitraining env`: package versions, the devices torch sees and Accelerate's environment."""
    import importlib.metadata as md
    import platform

    import torch

    lines = [f"python: {platform.python_version()} ({sys.executable})"]
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "bitsandbytes",
                "gradio"):
        try:
            lines.append(f"{pkg}: {md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg}: not installed")
    n = torch.cuda.device_count()
    lines.append(f"CUDA_VISIBLE_DEVICES: {os.environ.get('CUDA_VISIBLE_DEVICES', '(not set: all)')}")
    lines.append(f"GPUs: {n}" + "".join(f"\n  cuda:{i}: {torch.cuda.get_device_name(i)}" for i in range(n)))
    if n == 0:
        lines.append(f"CPU threads: {os.cpu_count()} (several processes on a CPU train over gloo)")
    lines += ["", "accelerate env:", accelerate_env()]
    return "\n".join(lines)


# -- after the launcher exits --------------------------------------------------------------------
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*\n"
                         r"(?:.*?\n)*?\s*traceback\s*:\s*([^\n]*)", re.S)


def failed_rank(output: str) -> Optional[tuple[int, int, str]]:
    """(rank, exit code, reason) from the launcher's failure report (torch elastic's "Root Cause")."""
    m = _ROOT_CAUSE.search(output or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3).strip()


def finish(run_dir: str | os.PathLike, returncode: int, output: str = "") -> None:
    """Make status.json tell the truth once the launched command has exited.

    A rank that is killed cannot write its status; the launcher then stops the others and reports
    which rank failed. A run still marked running/pending after a failing exit is marked failed,
    naming that rank when the report says it.
    """
    from core.events import read_status, write_status

    if returncode == 0:
        return
    status = read_status(run_dir)
    culprit = failed_rank(output)
    if culprit is None:
        if status.get("state") in ("running", "pending"):
            write_status(run_dir, "failed", error=f"the run exited with code {returncode} without a status "
                         "(killed?); see console output / running.log")
        return
    rank, code, reason = culprit
    if code == 0:  # a stop request ends in a signal exception, not in this report
        return
    why = f"signal {-code}" if code < 0 else f"exit code {code}"
    if reason and not reason.startswith("To enable traceback"):  # torch's placeholder says nothing
        why += f": {reason}"
    message = f"rank {rank} failed ({why}); the launcher stopped the other ranks"
    earlier = status.get("error") if status.get("state") == "failed" else None
    if earlier and f"rank {rank} failed" not in earlier:
        message += f". Rank 0 reported: {earlier}"
    write_status(run_dir, "failed", error=message, failed_rank=rank)
