"""Python API: `Project(params, backend="local", process=True).create()` runs one training run.

    from core import LLMTrainingParams, Project
    Project(LLMTrainingParams(model=..., data_path=..., project_name=..., peft=True)).create()

create() writes <project_name>/config.yaml, then trains: in a child process (process=True, the
default, as the CLI and the web UI do) or in this process (process=False). Returns the exit code.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from core import config_io
from core.errors import ConfigError
from core import launch
from core.launch import STOP_GRACE_S
from core.params import LLMTrainingParams


class Project:
    def __init__(self, params: LLMTrainingParams, backend: str = "local", process: bool = True):
        if backend != "local" or params.backend != "local":
            raise ConfigError(f"backend '{params.backend if backend == 'local' else backend}' is not "
                              "available in this build (no network); use backend local")
        self.params = params
        self.process = process
        self.run_dir = Path(params.project_name)
        self.estimate = None     # core.model.memory.Estimate, set by check()
        self.notes: list[str] = []  # what check() decided (a batch size found, checkpointing on)

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    def check(self) -> None:
        """Refuse what cannot run before any compute is spent."""
        from core.stages import STAGES
        p = self.params
        if p.push_to_hub and p.token is None and not os.environ.get("HF_TOKEN"):
            raise ConfigError("--push-to-hub needs a token: pass --token or set HF_TOKEN (a write token "
                              "from https://huggingface.co/settings/tokens)")
        if p.use_enhanced_eval:
            from core.evaluate import parse_metrics

            parse_metrics(p.eval_metrics)
        if p.curriculum and p.stage != "sft":
            raise ConfigError(f"--curriculum orders SFT examples; --trainer {p.trainer} does not use it. "
                              "Drop --curriculum or use --trainer sft")
        if p.use_sweep:
            from core.sweep import check

            check(p)
        # Cheapest first: model paths and their config.json (no torch), then the data (a malformed
        # record is reported in seconds, with its file and record number, instead of after the model
        # has loaded in the child process), then tokenizers and the chat template (transformers).
        check_model_paths(p)
        from core.data.loader import load_for_params

        train, _ = load_for_params(p, kind=STAGES[p.stage].data_kind)
        check_tokenizers(p)
        self.check_memory(train)

    def check_memory(self, records=None) -> None:
        """Estimate peak memory and step time (self.estimate); with --auto-find-batch-size pick the
        largest batch that fits; refuse a run that will not fit unless --no-memory-check."""
        from core.model import memory

        p = self.params
        config = memory.config_if_local(p.model, p.trust_remote_code)
        if config is None:  # not converted / downloaded yet: the run itself will tell
            self.estimate = None
            return
        seq = memory.data_seq_len(p, config, records)
        from core.model.loader import cpu_has_native_bf16, training_device

        device = training_device()
        if p.auto_find_batch_size:
            b, ga, _ = memory.find_batch_size(p, config=config, device=device, seq_len=seq,
                                              n_train=len(records) if records else None)
            if (b, ga) != (p.batch_size, p.gradient_accumulation):
                self.notes.append(f"--auto-find-batch-size: batch size {b} with gradient accumulation {ga} "
                                  f"(was {p.batch_size} x {p.gradient_accumulation}), the largest that the "
                                  f"memory estimate fits on {device}")
                self.params = p = memory.with_batch(p, b, ga)
        layers = memory.checkpoint_layers(p, device, config=config, seq_len=seq)
        est = memory.estimate(p, config=config, device=device, seq_len=seq, checkpointing=layers)
        if device == "cpu" and layers:
            self.notes.append(f"gradient checkpointing on {est.checkpointed_layers} of {est.layers} layers: "
                              "without it the run would not fit in memory")
        if device == "cpu" and not p.mixed_precision and cpu_has_native_bf16():
            self.notes.append("this CPU computes bf16 natively (AVX512-BF16/AMX): --mixed-precision bf16 trains "
                              "about 1.6-2x faster in about the same memory (bench/RESULTS.md)")
        self.notes += est.notes
        self.estimate = est
        if not est.fits and p.memory_check:
            raise ConfigError(memory.refusal(p, est, config))

    def report(self, file=None) -> None:
        """Print the memory / time estimate and check()'s decisions (to stderr by default)."""
        import sys

        file = file or sys.stderr
        for note in self.notes:
            print(note, file=file)
        if self.estimate is not None:
            print(self.estimate.summary(), file=file)

    def write_config(self) -> Path:
        self.check()
        return config_io.save(self.params, self.config_path)

    def create(self, report: bool = False) -> int:
        path = self.write_config()
        if report:
            self.report()
        if not self.process:
            from core.run import train

            return train(self.params, self.run_dir)
        cmd, env = launch.prepare(self.params, path)
        several = launch.is_multi_process(cmd)
        # Several processes: the launcher's failure report (which rank died, why) is read from
        # its stderr, which is passed through to the terminal as it comes.
        child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE if several else None)
        tail: collections.deque = collections.deque(maxlen=400)
        copier = None
        if several:
            copier = threading.Thread(target=_copy_lines, args=(child.stderr, tail), daemon=True)
            copier.start()
        deadline = None
        while True:
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                code = child.wait(timeout)
                break
            except KeyboardInterrupt:
                # Ctrl+C reached the child too (the terminal signals the whole foreground group):
                # it saves a checkpoint and exits. Wait for it rather than kill it mid-save; a
                # second Ctrl+C makes it stop at once without a checkpoint.
                if deadline is None:
                    deadline = time.monotonic() + STOP_GRACE_S
                print(f"Interrupted: the run is saving a checkpoint before it stops (at most "
                      f"{STOP_GRACE_S:.0f} s)...", file=sys.stderr, flush=True)
            except subprocess.TimeoutExpired:
                child.kill()  # past the grace time: stop it for good
                child.wait()
                print(f"The run did not stop within {STOP_GRACE_S:.0f} s and was killed; "
                      "--resume-from-checkpoint auto continues from its last complete checkpoint.",
                      file=sys.stderr, flush=True)
                code = 130
                break
        if copier is not None:
            copier.join(timeout=5)
        launch.finish(self.run_dir, code, "".join(tail))
        return code


def _copy_lines(stream, tail) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        tail.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()


def _resolve(flag: str, model_id: str):
    """resolve_model without converting packaged models; errors name the flag."""
    from core.errors import UserError
    from core.model.loader import resolve_model

    try:
        return resolve_model(model_id, materialize=False)
    except UserError as e:
        if flag == "--model":
            raise
        raise type(e)(f"{flag} {model_id}: {e}") from None


def check_model_paths(p: LLMTrainingParams) -> None:
    """Every model a run names resolves to a directory with a readable config.json (or an adapter,
    a hub id, a packaged model); imports neither torch nor transformers."""
    from pathlib import Path as _P

    from core.model.loader import adapter_base, check_model_dir, is_adapter_dir

    def check(flag, model_id):
        src = _resolve(flag, model_id)
        if isinstance(src, _P):
            if is_adapter_dir(src):
                check(f"{flag} (the base of the adapter {src})", adapter_base(src))
            else:
                check_model_dir(src, flag)

    for flag, value in (("--model", p.model), ("--model-ref", p.model_ref),
                        ("--teacher-model", p.teacher_model if p.stage == "distillation" else None)):
        if value:
            check(flag, value)
    if p.adapter_path and not is_adapter_dir(p.adapter_path) and not _P(p.adapter_path).is_dir():
        raise ConfigError(f"--adapter-path {p.adapter_path} does not exist. Fix: point it at a LoRA run "
                          "directory (the one holding adapter_config.json and adapter_model.safetensors)")
    if p.stage == "ppo":
        from core.stages.ppo import check_reward_source

        check_reward_source(p)


def check_tokenizers(p: LLMTrainingParams) -> None:
    """For local models: the tokenizer loads, the chat template resolves (e.g. --chat-template
    tokenizer on a tokenizer without one), a distillation teacher shares the student's vocabulary."""
    from pathlib import Path as _P

    from core.model.loader import adapter_base, is_adapter_dir, load_tokenizer
    from core.templates import resolve_chat_template

    def local_tokenizer(model_id):
        src = _resolve("--model", model_id)
        if not isinstance(src, _P):
            return None, None  # a hub id or a packaged model: checked when it is fetched / converted
        if is_adapter_dir(src) and not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return local_tokenizer(adapter_base(src))
        cfg = _P(src) / "config.json"
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type") if cfg.is_file() else None
        return model_type, load_tokenizer(src, trust_remote_code=p.trust_remote_code)

    model_type, tokenizer = local_tokenizer(p.model)
    if tokenizer is not None and p.stage != "pt":
        resolve_chat_template(p.chat_template, tokenizer, model_type)
    if p.stage == "distillation" and p.teacher_model and tokenizer is not None:
        _, teacher_tok = local_tokenizer(p.teacher_model)
        if teacher_tok is not None:
            from core.stages.distillation import check_same_tokenizer

            check_same_tokenizer(tokenizer, teacher_tok, p.model, p.teacher_model)
