"""Distributed training (core/launch.py): the launcher's argv for every layout, DeepSpeed's config,
and real two-process runs on this CPU over gloo (DDP with LoRA and full fine-tuning, DeepSpeed
ZeRO-2/3), a rank killed mid-run, and an abort from the web UI's runner.

The two-process runs start `tests/dist_probe.py`, which is `core.run` itself plus two spies that
record, per rank, the samples it trained on and the weights it held at the end.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_alpaca
from core import config_io, launch
from core.events import read_log, read_status
from core.params import LLMTrainingParams

PY = sys.executable
ACC = [PY, "-m", "accelerate.commands.launch"]
PROBE = str(REPO / "tests" / "dist_probe.py")


def params(**kw) -> LLMTrainingParams:
    return LLMTrainingParams(model="m", data_path="d", project_name="/runs/r", **kw)


# -- argv, exactly -----------------------------------------------------------------------------
CFG = "/runs/r/config.yaml"
THREADS = str(max(1, (os.cpu_count() or 1) // 2))


@pytest.mark.parametrize("kw,gpus,expected", [
    ({}, 0, [PY, "-m", "core.run", CFG]),
    ({}, 1, [PY, "-m", "core.run", CFG]),
    ({"distributed_backend": "ddp"}, 1, [PY, "-m", "core.run", CFG]),
    ({}, 4, ACC + ["--multi_gpu", "--num_processes", "4", "--num_machines", "1", "--main_process_port", "0",
                   "-m", "core.run", CFG]),
    ({"devices": "1,3"}, None, ACC + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                      "--main_process_port", "0", "-m", "core.run", CFG]),
    ({"num_processes": 2}, 8, ACC + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                     "--main_process_port", "0", "-m", "core.run", CFG]),
    ({"num_processes": 2, "main_process_port": 29555}, 0,
     ACC + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29555",
            "--num_cpu_threads_per_process", THREADS, "-m", "core.run", CFG]),
    ({"distributed_backend": "deepspeed"}, 2,
     ACC + ["--use_deepspeed", "--deepspeed_config_file", "/runs/r/deepspeed_config.json", "--zero3_init_flag", "true",
            "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0", "-m", "core.run", CFG]),
    ({"distributed_backend": "deepspeed", "deepspeed_stage": 2}, 1,
     ACC + ["--use_deepspeed", "--deepspeed_config_file", "/runs/r/deepspeed_config.json",
            "--num_processes", "1", "--num_machines", "1", "--main_process_port", "0", "-m", "core.run", CFG]),
    ({"distributed_backend": "deepspeed", "num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1"}, 8,
     ACC + ["--use_deepspeed", "--deepspeed_config_file", "/runs/r/deepspeed_config.json", "--zero3_init_flag", "true",
            "--deepspeed_multinode_launcher", "standard", "--num_processes", "16", "--num_machines", "2",
            "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500",
            "-m", "core.run", CFG]),
    ({"num_machines": 2, "main_process_ip": "10.0.0.1", "main_process_port": 6000}, 4,
     ACC + ["--multi_gpu", "--num_processes", "8", "--num_machines", "2", "--machine_rank", "0",
            "--main_process_ip", "10.0.0.1", "--main_process_port", "6000", "-m", "core.run", CFG]),
    ({"distributed_backend": "fsdp"}, 2,
     ACC + ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true",
            "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0", "-m", "core.run", CFG]),
])
def test_launcher_argv_for_each_layout(kw, gpus, expected):
    assert launch.build_command(params(**kw), CFG, gpus=gpus) == expected


def test_devices_pick_gpus_through_cuda_visible_devices():
    env = launch.build_env(params(devices="1, 3"), base={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert launch.build_env(params(), base={"CUDA_VISIBLE_DEVICES": "2"})["CUDA_VISIBLE_DEVICES"] == "2"


@pytest.mark.parametrize("kw,match", [
    ({"num_machines": 2}, "--main-process-ip"),
    ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "below --num-machines 2"),
    ({"deepspeed_offload": "cpu"}, "needs --distributed-backend deepspeed"),
    ({"distributed_backend": "deepspeed", "deepspeed_offload": "nvme"}, "--deepspeed-nvme-path"),
    ({"distributed_backend": "deepspeed", "optimizer": "galore_adamw_layerwise"}, "layer by layer"),
    ({"distributed_backend": "fsdp", "peft": True, "quantization": "int4"}, "QLoRA"),
    ({"distributed_backend": "deepspeed", "deepspeed_stage": 1}, "greater than or equal to 2"),
])
def test_distribution_settings_that_cannot_work_are_refused(kw, match):
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        config_io.build(dict(model="m", data_path="d", project_name="p", **kw), "test")


def test_flags_and_yaml_carry_the_distribution_settings(tmp_path):
    from core.cli import make_params, parse_llm

    _, given = parse_llm(["--num-processes", "2", "--num-machines", "2", "--machine-rank", "1",
                          "--main-process-ip", "10.1.2.3", "--main-process-port", "7000",
                          "--distributed-backend", "deepspeed", "--deepspeed-stage", "2",
                          "--deepspeed-offload", "cpu", "--devices", "0,1", "--project-name", str(tmp_path / "r")])
    p = make_params(None, given)
    path = config_io.save(p, tmp_path / "run.yaml")
    back = config_io.load(path)
    assert (back.num_processes, back.num_machines, back.machine_rank, back.main_process_ip, back.main_process_port,
            back.distributed_backend, back.deepspeed_stage, back.deepspeed_offload, back.devices) == (
        2, 2, 1, "10.1.2.3", 7000, "deepspeed", 2, "cpu", "0,1")


# -- DeepSpeed's own validation of the generated config ------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"deepspeed_stage": 2}, {"deepspeed_offload": "cpu"},
                                {"deepspeed_offload": "nvme", "deepspeed_nvme_path": "/tmp"},
                                {"mixed_precision": "bf16"}, {"mixed_precision": "fp16", "deepspeed_stage": 2}])
def test_generated_zero_config_passes_deepspeed_validation(kw):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    p = params(distributed_backend="deepspeed", **kw)
    cfg = launch.deepspeed_config(p)
    # what transformers does at run time: fill the "auto" values from the TrainingArguments
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(cfg)))
    args = TrainingArguments(output_dir="/tmp/unused", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             bf16=p.mixed_precision == "bf16", fp16=p.mixed_precision == "fp16", report_to=[],
                             use_cpu=True)
    hf.trainer_config_process(args)

    class Tiny:
        class config:
            hidden_size = 64

    hf.trainer_config_finalize(args, Tiny(), 10)
    ds = DeepSpeedConfig(hf.config)  # raises on anything DeepSpeed does not accept
    assert ds.zero_optimization_stage == p.deepspeed_stage
    assert ds.train_micro_batch_size_per_gpu == 2 and ds.gradient_accumulation_steps == 4
    assert ds.bfloat16_config.enabled == (p.mixed_precision == "bf16")
    assert ds.float16_config.enabled == (p.mixed_precision == "fp16")
    offload = ds.zero_config.offload_optimizer
    assert (str(getattr(offload.device, "value", offload.device)) if offload else None) == p.deepspeed_offload
    if p.deepspeed_stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # and the validation is real: a key DeepSpeed does not know is refused
    hf.config["zero_optimization"]["stage3_no_such_key"] = 1
    with pytest.raises(Exception, match="stage3_no_such_key"):
        DeepSpeedConfig(hf.config)


def test_more_processes_than_gpus_is_refused(tmp_path):
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="needs 3 GPUs on each machine, but 2 are visible"):
        launch.prepare(params(devices="0,1", num_processes=3), tmp_path / "config.yaml")


def test_missing_deepspeed_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from core.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        launch.prepare(params(distributed_backend="deepspeed"), tmp_path / "config.yaml")


def test_failed_rank_is_read_from_the_launcher_report(tmp_path):
    report = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
core.run FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-23_16:40:01
  host      : box
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================"""
    assert launch.failed_rank(report) == (1, -9, "Signal 9 (SIGKILL) received by PID 4242")
    from core.events import write_status

    write_status(tmp_path, "failed", error="RuntimeError: Connection closed by peer")
    launch.finish(tmp_path, 1, report)
    status = read_status(tmp_path)
    assert status["state"] == "failed" and status["failed_rank"] == 1
    assert status["error"].startswith("rank 1 failed (signal 9: Signal 9 (SIGKILL)")
    assert "Connection closed by peer" in status["error"]


def test_env_command_prints_versions_devices_and_accelerate_env():
    proc = subprocess.run([PY, "-m", "core.cli", "env"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch: {torch.__version__}" in out and "accelerate: " in out
    assert f"GPUs: {torch.cuda.device_count()}" in out
    assert "accelerate env:" in out and "`Accelerate` version" in out


# -- real runs: two processes on this CPU ----------------------------------------------------------
def _params(tiny_model_dir, data, out, **kw) -> LLMTrainingParams:
    base = dict(model=str(tiny_model_dir), data_path=str(data), project_name=str(out), chat_template="chatml",
                epochs=1, batch_size=2, gradient_accumulation=1, lr=2e-3, log="none", logging_steps=1,
                save_strategy="no", seed=7, warmup_ratio=0.0, merge_adapter=False,
                lora_dropout=0.0)  # dropout masks differ between ranks and one process
    base.update(kw)
    return LLMTrainingParams(**base)


def _launch_probe(p: LLMTrainingParams, timeout=400) -> subprocess.CompletedProcess:
    from core.project import Project

    project = Project(p)
    config = project.write_config()
    cmd, env = launch.prepare(p, config)
    assert cmd[-3:] == ["-m", "core.run", str(config.resolve())]
    cmd = cmd[:-3] + [PROBE, str(config)]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _probes(run_dir: Path) -> list[dict]:
    return [torch.load(run_dir / f"probe-rank{r}.pt", weights_only=False) for r in (0, 1)]


def _single_process(p: LLMTrainingParams, tmp: Path) -> dict:
    """The same run in this process with the same global batch (2 ranks x batch 2 = batch 4)."""
    from core.stages import common, sft

    single = p.model_copy(update={"project_name": str(tmp), "batch_size": p.batch_size * 2, "num_processes": None})
    trainer, tok, template, has_eval = sft.build_trainer(single, tmp)
    trainer.train()
    return {n: w.detach().float() for n, w in trainer.model.named_parameters() if w.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_process_ddp_shards_data_and_matches_one_process(method, tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "t.jsonl", repeat=2)  # 12 records: 3 steps of 2 x 2
    p = _params(tiny_model_dir, data, tmp_path / "ddp", num_processes=2, finetuning_type=method)
    proc = _launch_probe(p)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _probes(tmp_path / "ddp")
    assert r0["world_size"] == r1["world_size"] == 2

    # each rank trained on its own shard; together they cover the data once
    s0 = [s for b in r0["batches"] for s in b]
    s1 = [s for b in r1["batches"] for s in b]
    assert len(s0) == len(s1) == 6
    assert s0 != s1 and [b for b in r0["batches"]] != [b for b in r1["batches"]]
    from collections import Counter
    assert sum((Counter(s0) + Counter(s1)).values()) == 12
    # the logged losses (reduced over ranks) and the weights agree on every rank
    losses0 = [h["loss"] for h in r0["log_history"] if "loss" in h]
    losses1 = [h["loss"] for h in r1["log_history"] if "loss" in h]
    assert len(losses0) == 3 and losses0 == losses1
    assert r0["weights"].keys() == r1["weights"].keys() and r0["weights"]
    for n in r0["weights"]:
        assert torch.equal(r0["weights"][n], r1["weights"][n]), n

    # one process with the same global batch ends with the same weights
    single = _single_process(p, tmp_path / "single")
    for n, w in r0["weights"].items():
        key = n if n in single else n.replace("module.", "")
        torch.testing.assert_close(w, single[key], atol=2e-4, rtol=1e-3, msg=n)
    # only rank 0 wrote the run directory: one log line per step, a status, the environment
    run = tmp_path / "ddp"
    records, _ = read_log(run / "trainer_log.jsonl")
    assert [r["step"] for r in records if r.get("loss") is not None] == [1, 2, 3]
    assert read_status(run)["state"] == "finished"
    assert "[rank 1]" not in (run / "running.log").read_text()
    assert "Accelerate` version" in (run / "accelerate_env.txt").read_text()

    # the saved model reloads and holds what the ranks held
    _assert_saved_equals(run, tiny_model_dir, method, r0["weights"])


def _assert_saved_equals(run: Path, base_dir: Path, method: str, weights: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == "lora":
        from safetensors.torch import load_file

        assert load_file(run / "adapter_model.safetensors"), "empty adapter file"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run)
    else:
        model = AutoModelForCausalLM.from_pretrained(run)
    saved = {n.replace(".default.", "."): w for n, w in model.named_parameters()}
    assert weights
    # training moved the weights (LoRA B starts at zero; full starts from the base)
    base = {n: w for n, w in AutoModelForCausalLM.from_pretrained(base_dir).named_parameters()}
    if method == "lora":
        assert any(w.abs().sum() > 0 for n, w in saved.items() if "lora_B" in n)
    else:
        assert sum(not torch.equal(base[n], saved[n]) for n in base) == len(base)
    for n, w in weights.items():
        key = n.replace(".default.", ".")
        key = key if key in saved else next(k for k in saved if k.endswith(key.split(".", 2)[-1]))
        torch.testing.assert_close(saved[key].detach().float(), w, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("backend,stage,method", [("deepspeed", 2, "full"), ("deepspeed", 3, "lora"),
                                                  ("fsdp", 3, "full")])
def test_two_process_sharded_run_saves_a_model_that_reloads(backend, stage, method, tiny_model_dir, tmp_path):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    data = write_alpaca(tmp_path / "t.jsonl", repeat=2)
    p = _params(tiny_model_dir, data, tmp_path / "ds", num_processes=2, distributed_backend=backend,
                deepspeed_stage=stage, finetuning_type=method)
    proc = _launch_probe(p)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "ds"
    if backend == "deepspeed":
        assert json.loads((run / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage
    assert read_status(run)["state"] == "finished"
    r0, r1 = _probes(run)
    for n in r0["weights"]:
        torch.testing.assert_close(r0["weights"][n], r1["weights"][n], msg=n)
    _assert_saved_equals(run, tiny_model_dir, method, r0["weights"])


def _children_with_rank(pid: int) -> dict[int, int]:
    import psutil

    found = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "core.run" in " ".join(child.cmdline()):
            found[int(rank)] = child.pid
    return found


def _wait_for_step(run: Path, step: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (read_status(run).get("step") or 0) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} within {timeout} s: {read_status(run)}")


@pytest.mark.slow
def test_a_killed_rank_stops_the_whole_run_and_status_names_it(tiny_model_dir, tmp_path):
    import psutil

    data = write_alpaca(tmp_path / "t.jsonl", repeat=200)
    run = tmp_path / "kill"
    args = ["--train", "--model", str(tiny_model_dir), "--data-path", str(data), "--project-name", str(run),
            "--chat-template", "chatml", "--num-processes", "2", "--batch-size", "2", "--gradient-accumulation", "1",
            "--log", "none", "--logging-steps", "1", "--save-strategy", "no"]
    cli = subprocess.Popen([PY, "-m", "core.cli", "llm", *args], env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(run, 2, 300)
        ranks = _children_with_rank(cli.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.time()
        _, err = cli.communicate(timeout=90)
        took = time.time() - killed
    finally:
        if cli.poll() is None:
            cli.kill()
    print(f"the run ended {took:.1f} s after rank 1 was killed")
    assert cli.returncode != 0
    assert took < 90
    assert not psutil.pid_exists(ranks[0]) or psutil.Process(ranks[0]).status() == psutil.STATUS_ZOMBIE
    status = read_status(run)
    assert status["state"] == "failed", status
    assert status["failed_rank"] == 1 and "rank 1 failed (signal 9" in status["error"], status
    assert "rank 1 failed" in err or "Root Cause" in err


@pytest.mark.slow
def test_abort_from_the_web_ui_stops_every_rank(tiny_model_dir, tmp_path):
    import psutil

    from webui.runner import Runner, group_alive

    data = write_alpaca(tmp_path / "t.jsonl", repeat=200)
    runner = Runner(tmp_path)
    p = _params(tiny_model_dir, data, tmp_path / "abort", num_processes=2, save_strategy="steps", save_steps=10_000)
    run = runner.start(p)
    leader = runner.proc.pid
    try:
        _wait_for_step(run, 2, 300)
        ranks = _children_with_rank(leader)
        assert sorted(ranks) == [0, 1], ranks
        assert runner.abort(grace=60) == run
        deadline = time.time() + 90
        while group_alive(leader) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        if group_alive(leader):
            os.killpg(leader, signal.SIGKILL)
    assert not group_alive(leader), "ranks left behind"
    for pid in ranks.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    deadline = time.time() + 10
    while read_status(run).get("state") in ("running", "pending") and time.time() < deadline:
        time.sleep(0.2)
    status = read_status(run)
    assert status["state"] == "aborted", status
    assert list(run.glob("checkpoint-*/trainer_state.json")), "no checkpoint saved on abort"
