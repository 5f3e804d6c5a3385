"""Push to hub, tested up to the network boundary: a fake hub on loopback implements the three
endpoints huggingface_hub calls for create_repo + upload_folder (repo create, preupload, commit) and
writes what it receives to disk. A run with --push-to-hub uploads its model with a model card to the
private repo {username}/{project-name}; the token reaches the hub as a header and nowhere else (not
in any file of the run directory, not in its logs, not on the console); an unreachable hub is a clear
one-paragraph error with exit code 2."""
import base64
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import write_alpaca

TOKEN = "hf_testSECRET0123456789abcdefXYZ"


class FakeHub:
    """Just enough of the Hub API: POST /api/repos/create, /api/validate-yaml (model card front
    matter), /api/models/<repo>/preupload/<rev> (every file "regular", i.e. inline, no LFS) and
    /api/models/<repo>/commit/<rev> (NDJSON with base64 files). Files land in root/<repo>/."""

    def __init__(self, root: Path, token: str = TOKEN):
        self.root, self.token, self.repos, self.auth_seen = root, token, {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply(404, {"error": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                auth = self.headers.get("Authorization", "")
                hub.auth_seen.append(auth)
                if auth != f"Bearer {hub.token}":
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}"
                    hub.repos[repo] = req
                    return self.reply(200, {"url": f"{base}/{repo}"})
                if self.path == "/api/validate-yaml":  # huggingface_hub checks a README's front matter
                    return self.reply(200, {"errors": [], "warnings": []})
                parts = self.path.split("/")  # /api/models/<user>/<name>/<op>/<rev>
                repo, op = f"{parts[3]}/{parts[4]}", parts[5]
                if repo not in hub.repos:
                    return self.reply(404, {"error": "Repository not found"})
                if op == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if op == "commit":
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            dest = hub.root / repo / item["value"]["path"]
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(base64.b64decode(item["value"]["content"]))
                    return self.reply(200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                self.reply(404, {"error": "unknown endpoint"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    online(monkeypatch)
    yield hub
    hub.close()


def online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 (no test may reach the internet); these tests reach loopback only."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def online_env(endpoint: str) -> dict:
    """A child's environment aimed at `endpoint` (loopback), without the offline switches."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env["HF_ENDPOINT"] = endpoint
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_folder_uploads_every_file_to_a_private_repo_with_a_card(fake_hub, tmp_path):
    from core.errors import ConfigError
    from core.model import hub

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    card = hub.model_card("ada/my-run", base_model="google/gemma-3-270m", trainer="sft", method="lora")
    url = hub.push_folder(folder, hub.repo_id_for("ada", "./models/my-run/"), token=TOKEN, card=card)
    assert url == f"{fake_hub.url}/ada/my-run"
    assert fake_hub.repos["ada/my-run"]["visibility"] == "private"
    got = fake_hub.root / "ada/my-run"
    assert (got / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert (got / "config.json").read_text() == '{"model_type": "llama"}'
    assert not (got / "checkpoint-2").exists()
    readme = (got / "README.md").read_text()
    assert "base_model: google/gemma-3-270m" in readme and "- lora" in readme and "ada/my-run" in readme

    with pytest.raises(ConfigError, match="HTTP 401") as e:  # a rejected token: clear, and not echoed
        hub.push_folder(folder, "ada/other", token="hf_wrongTOKENvalue")
    assert "hf_wrongTOKENvalue" not in str(e.value) and "--token" in str(e.value)


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    online(monkeypatch)
    from core.errors import ConfigError
    from core.model import hub

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="unreachable") as e:
        hub.push_folder(tmp_path / "m", "ada/x", token=TOKEN)
    assert TOKEN not in str(e.value)


@pytest.mark.slow
def test_export_cli_push_to_unreachable_hub_exits_2_without_traceback(tiny_model_dir, tmp_path):
    env = online_env(f"http://127.0.0.1:{closed_port()}")
    proc = subprocess.run([sys.executable, "-m", "core.cli", "export", "--model", str(tiny_model_dir),
                           "--output", str(tmp_path / "out"), "--push-to-hub", "--username", "ada",
                           "--token", TOKEN], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_training_run_pushes_to_hub_and_the_token_stays_secret(fake_hub, tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "train.jsonl")
    run = tmp_path / "models" / "my-run"
    env = online_env(fake_hub.url)
    proc = subprocess.run([sys.executable, "-m", "core.cli", "llm", "--train", "--model", str(tiny_model_dir),
                           "--data-path", str(data), "--project-name", str(run), "--peft", "--epochs", "1",
                           "--max-samples", "4", "--log", "none", "--chat-template", "chatml",
                           "--save-strategy", "steps", "--save-steps", "1",
                           "--push-to-hub", "--username", "ada", "--token", TOKEN],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["pushed_to"] == f"{fake_hub.url}/ada/my-run"
    assert fake_hub.repos["ada/my-run"]["visibility"] == "private"
    repo = fake_hub.root / "ada/my-run"
    assert (repo / "adapter_model.safetensors").read_bytes() == (run / "adapter_model.safetensors").read_bytes()
    assert (repo / "merged" / "config.json").is_file() and (repo / "config.yaml").is_file()
    # the run's own model card (written by training) is the one uploaded
    assert (repo / "README.md").read_text() == (run / "README.md").read_text()
    assert list(run.glob("checkpoint-*")) and not list(repo.glob("checkpoint-*"))
    assert not (repo / "running.log").exists()
    assert set(fake_hub.auth_seen) == {f"Bearer {TOKEN}"}  # the token did reach the hub
    # ... and nothing else: no file of the run directory (logs, YAML, checkpoints) holds it
    secret = TOKEN.encode()
    leaks = [p for p in run.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaks == [] and TOKEN not in proc.stdout + proc.stderr
    assert (run / "running.log").stat().st_size > 0


def test_push_without_a_token_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch):
    from core import LLMTrainingParams, Project
    from core.errors import ConfigError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    p = LLMTrainingParams(model=str(tiny_model_dir), data_path=str(write_alpaca(tmp_path / "t.jsonl")),
                          project_name=str(tmp_path / "run"), push_to_hub=True, username="ada", log="none")
    with pytest.raises(ConfigError, match="needs a token"):
        Project(p, process=False).create()
    assert not (tmp_path / "run" / "status.json").exists()  # nothing ran
