"""Misuse, without a browser: paths that try to leave --runs-dir / --data-dir, YAML that tries to
build Python objects, a model repository that ships its own code, and tokens that must never be
written in clear. The secrets scan runs real tiny trainings (token by flag, token by environment)
and greps every byte of their run directories."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, build_tiny_model, write_alpaca
from core import config_io
from core.errors import ConfigError, UserError
from core.params import LLMTrainingParams
from webui.guard import confine, inside
from webui.runner import Runner

TOKEN = "hf_ZqWx7SecretFlagToken0123456789abcd"  # distinctive: any hit is a leak
ENV_TOKEN = "hf_EnvOnlyToken9876543210zyxwvUTSRQ"
WANDB_KEY = "wandbkey0123456789abcdef0123456789abcdef"


def env_without_tokens(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def scan(root: Path, needles: list[str]) -> list[str]:
    """Every file under root (binary too) that contains one of the needles, as 'path: needle'."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


# -- paths ---------------------------------------------------------------------------------------

def test_paths_cannot_leave_their_roots(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    runs.mkdir()
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}), encoding="utf-8")
    write_alpaca(data / "mine.jsonl")
    (runs / "link-out").symlink_to(tmp_path)  # a symlink inside that points out

    assert inside(runs, "my-run", "project_name", "--runs-dir") == (runs / "my-run").resolve()
    assert inside(runs, runs / "a" / "b", "project_name", "--runs-dir") == (runs / "a" / "b").resolve()
    for bad in ["../escape", str(tmp_path / "elsewhere"), "/etc", "a/../../x", "link-out/x", "~/x"]:
        with pytest.raises(ConfigError) as e:
            inside(runs, bad, "project_name (output directory)", "--runs-dir")
        msg = str(e.value)
        assert f"'{bad}'" in msg and str(runs.resolve()) in msg and "--runs-dir" in msg and "my-run" in msg
    with pytest.raises(ConfigError, match="directory itself"):
        inside(runs, ".", "project_name", "--runs-dir", allow_root=False)

    base = dict(model="m", trainer="sft", dataset_dir=str(data))
    ok = confine(LLMTrainingParams(**base, project_name="run-1", data_path="mine,mine.jsonl"), runs, data)
    assert ok.project_name == str((runs / "run-1").resolve())
    assert ok.data_path == f"mine,{(data / 'mine.jsonl').resolve()}"  # a name stays a name
    for field, value in [("project_name", "../../outside"), ("project_name", "/tmp/x"),
                         ("data_path", "../secret.jsonl"), ("data_path", "mine,/etc/passwd"),
                         ("dataset_dir", str(tmp_path))]:
        kw = {**base, "project_name": "run-2", "data_path": "mine", field: value}
        with pytest.raises(ConfigError, match="outside") as e:
            confine(LLMTrainingParams(**kw), runs, data)
        assert field.split("_")[0] in str(e.value)


def test_runner_refuses_a_run_directory_outside_the_runs_root(tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "train.jsonl")
    runner = Runner(tmp_path / "runs")
    outside = tmp_path / "not-runs" / "x"
    p = LLMTrainingParams(model=str(tiny_model_dir), data_path=str(data), project_name=str(outside),
                          trainer="sft", chat_template="chatml")
    with pytest.raises(ConfigError, match="outside"):
        runner.start(p)
    with pytest.raises(ConfigError, match="outside"):
        runner.start(p.model_copy(update={"project_name": str(tmp_path / "runs" / ".." / "sneaky")}))
    assert not outside.exists() and not (tmp_path / "sneaky").exists() and runner.proc is None


# -- YAML ----------------------------------------------------------------------------------------

def test_yaml_with_python_tags_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"task: llm-sft\nbase_model: !!python/object/apply:os.system ['touch {marker}']\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        config_io.load(evil)
    assert "python/object/apply:os.system" in str(e.value) and "line 2" in str(e.value)
    assert "remove the tag" in str(e.value)
    out = subprocess.run([sys.executable, "-m", "core.cli", "--config", str(evil)], capture_output=True,
                         text=True, cwd=tmp_path, env=env_without_tokens(), timeout=300)
    assert out.returncode == 2, out.stderr
    assert "refused" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


# -- remote code -----------------------------------------------------------------------------------

def evil_model(root: Path) -> tuple[Path, Path]:
    """A tiny Llama whose config.json asks for its own configuration code, which leaves a marker
    file when it is imported."""
    path = build_tiny_model(root / "evil-model")
    marker = root / "remote-code-ran"
    (path / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    pass\n", encoding="utf-8")
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return path, marker


def test_a_model_repositorys_own_code_runs_only_when_asked(tmp_path):
    from core.model import loader
    from core.stages.common import load_tokenizer_and_template

    path, marker = evil_model(tmp_path)
    assert LLMTrainingParams().trust_remote_code is False
    load_tokenizer_and_template(LLMTrainingParams(model=str(path), chat_template="chatml"))  # training
    loader.load_for_inference(str(path))  # chat and export
    assert not marker.exists(), "the repository's code ran without --trust-remote-code"
    load_tokenizer_and_template(LLMTrainingParams(model=str(path), chat_template="chatml", trust_remote_code=True))
    assert marker.read_text() == "ran"  # the same loader does run it when asked: the check can fail


# -- secrets ---------------------------------------------------------------------------------------

def test_redact_masks_known_tokens_wherever_a_message_goes(tmp_path, monkeypatch):
    import logging

    from pydantic import SecretStr

    from core.events import read_status, write_status
    from core.redaction import RedactingFormatter, RedactingStream, redact, register
    from webui.tabs.train import error_html

    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    register(SecretStr(TOKEN), None, "short")
    text = f"failed with {TOKEN} and {WANDB_KEY}; short stays"
    assert redact(text) == "failed with *** and ***; short stays"
    assert redact(None) is None and redact("") == ""

    write_status(tmp_path, "failed", error=f"hub said no to {TOKEN}")
    assert TOKEN not in (tmp_path / "status.json").read_text() and read_status(tmp_path)["error"] == "hub said no to ***"

    log = logging.getLogger("aitraining.test-redact")
    handler = logging.FileHandler(tmp_path / "running.log", encoding="utf-8")
    handler.setFormatter(RedactingFormatter("%(message)s"))
    log.addHandler(handler)
    try:
        raise RuntimeError(f"token {ENV_TOKEN} rejected")
    except RuntimeError:
        monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
        log.exception("request with %s failed", TOKEN)
    finally:
        log.removeHandler(handler)
        handler.close()
    logged = (tmp_path / "running.log").read_text()
    assert "Traceback" in logged and TOKEN not in logged and ENV_TOKEN not in logged and logged.count("***") == 2

    with open(tmp_path / "console.log", "w", encoding="utf-8") as f:
        RedactingStream(f).write(f"print {TOKEN}\n")
    assert (tmp_path / "console.log").read_text() == "print ***\n"
    assert TOKEN not in error_html(f"bad {TOKEN}") and "***" in error_html(f"bad {TOKEN}")


def test_cli_errors_never_echo_the_token(tmp_path, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "core.cli", "llm", "--train", "--token", TOKEN, "--model",
                          str(tiny_model_dir),
                          "--data-path", str(tmp_path / f"{TOKEN}.jsonl"), "--project-name", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=tmp_path, env=env_without_tokens(), timeout=300)
    assert out.returncode == 2 and "***.jsonl" in out.stderr, out.stderr
    assert TOKEN not in out.stdout + out.stderr


def test_a_token_in_the_run_yaml_is_not_written_back(tmp_path, tiny_model_dir):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"task: llm-sft\nbase_model: {tiny_model_dir}\nproject_name: {tmp_path / 'r'}\nlog: none\n"
                        f"hub:\n  token: {TOKEN}\n", encoding="utf-8")
    assert config_io.load(run_yaml).token.get_secret_value() == TOKEN  # it is read...
    data = write_alpaca(tmp_path / "train.jsonl")
    out = subprocess.run([sys.executable, "-m", "core.cli", "llm", "--config", str(run_yaml), "--data-path",
                          str(data), "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                         env=env_without_tokens(), timeout=300)
    assert out.returncode == 0, out.stderr
    import yaml

    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert written["hub"] == {"push_to_hub": False, "username": None}  # ...never written
    assert scan(tmp_path / "r", [TOKEN]) == [] and TOKEN not in out.stdout + out.stderr


@pytest.mark.slow
def test_a_real_run_leaves_no_token_in_any_file(tmp_path):
    """A tiny training given the hub token by --token and two more by the environment
    (HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY), with TensorBoard logging, checkpoints, the merged
    model and its card. Every file of the run directory is searched, binary files included.
    The model ships its own code: that must not run either."""
    model, marker = evil_model(tmp_path)
    data = write_alpaca(tmp_path / "train.jsonl")
    run = tmp_path / "runs" / "secret-run"
    out = subprocess.run([sys.executable, "-m", "core.cli", "llm", "--train", "--model", str(model), "--data-path",
                          str(data), "--trainer", "sft", "--chat-template", "chatml", "--peft", "--max-steps", "2",
                          "--batch-size", "2", "--save-strategy", "steps", "--save-steps", "1", "--logging-steps",
                          "1", "--eval-strategy", "no", "--log", "tensorboard", "--project-name", str(run),
                          "--token", TOKEN],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env=env_without_tokens(HUGGING_FACE_HUB_TOKEN=ENV_TOKEN, WANDB_API_KEY=WANDB_KEY))
    assert out.returncode == 0, out.stderr[-3000:]
    names = {p.name for p in run.rglob("*")}
    assert {"config.yaml", "status.json", "trainer_log.jsonl", "running.log", "adapter_model.safetensors",
            "README.md", "training_args.bin"} <= names, names
    assert any(n.startswith("checkpoint-") for n in names) and any(n.startswith("events.out.tfevents") for n in names)
    assert sum(1 for p in run.rglob("*") if p.is_file()) >= 15
    assert scan(run, [TOKEN, ENV_TOKEN, WANDB_KEY]) == []
    assert TOKEN not in out.stdout + out.stderr
    assert not marker.exists(), "the model's own code ran without --trust-remote-code"
