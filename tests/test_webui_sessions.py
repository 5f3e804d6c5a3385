"""The web UI under load and misuse, against a real `launch.py --auth`: what it listens on, what an
unauthenticated request gets from every route, the upload size limit, and five browser sessions
at once (Playwright + Chromium): one shared run, one Start at a time, chat answering in another
session while the run trains, paths refused, and the hub token nowhere in any page or run file."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import REPO
from test_webui_browser import CHROMIUM_ARGS, chromium_path, free_port

USER, PASSWORD = "ada", "correct-horse-battery"
TOKEN = "hf_UiSessionToken0123456789abcdefXYZ"  # typed into the form; any hit is a leak
SESSIONS = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ui-auth")
    data, runs = root / "data", root / "runs"
    shutil.copytree(REPO / "data", data)
    port = free_port()
    log = open(root / "ui.log", "wb")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--port", str(port), "--runs-dir", str(runs),
                             "--data-dir", str(data), "--auth", f"{USER}:{PASSWORD}", "--max-upload-mb", "1"],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
                                 "GRADIO_TEMP_DIR": str(root / "gradio-tmp")})
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (root / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
    yield {"url": url, "port": port, "pid": proc.pid, "runs": runs, "data": data, "root": root,
           "model": str(tiny_model_dir)}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def login(client: httpx.Client, url: str, password: str = PASSWORD) -> httpx.Response:
    return client.post(url + "login", data={"username": USER, "password": password})


def test_listens_on_loopback_only_and_auth_guards_every_route(server):
    url = server["url"]
    listening = {c.laddr for c in psutil.Process(server["pid"]).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
    assert {a.port for a in listening} == {server["port"]}

    data_file = server["data"] / "dataset_info.json"
    with httpx.Client(timeout=30) as anon:
        # the page itself: only the login shell, nothing of the app
        page = anon.get(url)
        assert page.status_code == 200
        for secret in (str(server["runs"]), str(server["data"]), "Learning rate", "identity", "btn-start"):
            assert secret not in page.text, f"the login page shows {secret!r}"
        assert '"named_endpoints":{}' in page.text.replace(" ", "")  # no API description either
        refused = {
            "GET /config": anon.get(url + "config"),
            "GET /gradio_api/info": anon.get(url + "gradio_api/info"),
            "GET /gradio_api/openapi.json": anon.get(url + "gradio_api/openapi.json"),
            "GET /gradio_api/queue/status": anon.get(url + "gradio_api/queue/status"),
            "GET /gradio_api/queue/data": anon.get(url + "gradio_api/queue/data", params={"session_hash": "x"}),
            "POST /gradio_api/queue/join": anon.post(url + "gradio_api/queue/join",
                                                     json={"data": [], "fn_index": 0, "session_hash": "x"}),
            "POST /gradio_api/upload": anon.post(url + "gradio_api/upload", files={"files": ("a.jsonl", b"{}\n")}),
            "GET /gradio_api/file=": anon.get(url + f"gradio_api/file={data_file}"),
            "POST /gradio_api/call/start": anon.post(url + "gradio_api/call/start", json={"data": []}),
            "POST /gradio_api/run/start": anon.post(url + "gradio_api/run/start", json={"data": []}),
            "GET /monitoring": anon.get(url + "monitoring"),
        }
        for route, r in refused.items():
            assert r.status_code == 401, (route, r.status_code, r.text[:200])
            assert "identity" not in r.text and str(server["runs"]) not in r.text, route
        bad = login(anon, url, "wrong-password")
        assert bad.status_code in (400, 401) and not anon.cookies
        assert anon.get(url + "config").status_code == 401

    with httpx.Client(timeout=30) as user:
        assert login(user, url).status_code == 200
        config = user.get(url + "config")
        assert config.status_code == 200 and "Learning rate" in config.text  # the same route, logged in
        # the event handlers are not a public API even for a logged-in client
        assert user.get(url + "gradio_api/info").json()["named_endpoints"] == {}
        # uploads: over the limit refused, under it kept in Gradio's temp folder (the Datasets tab
        # copies it into the data directory and deletes that copy)
        before = sorted(p.name for p in server["data"].iterdir())
        big = user.post(url + "gradio_api/upload", files={"files": ("big.jsonl", b"x" * (1024 * 1024 + 10))})
        assert big.status_code == 413, (big.status_code, big.text[:200])
        small = user.post(url + "gradio_api/upload", files={"files": ("small.jsonl", b'{"a": 1}\n')})
        assert small.status_code == 200, small.text
        stored = Path(small.json()[0])
        assert stored.is_file() and server["data"] not in stored.parents and server["runs"] not in stored.parents
        assert sorted(p.name for p in server["data"].iterdir()) == before


class Session:
    """One logged-in browser context (its own cookies and Gradio session) with one page."""

    def __init__(self, browser, server, shots: Path, n: int):
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 1600})
        assert self.ctx.request.post(server["url"] + "login",
                                     form={"username": USER, "password": PASSWORD}).status == 200
        self.pg = self.ctx.new_page()
        self.pg.set_default_timeout(60_000)
        self.pg.goto(server["url"])
        self.pg.wait_for_selector("#field-model input")
        self.shots, self.n = shots, n
        shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name):
        self.pg.screenshot(path=str(self.shots / f"session{self.n}-{name}.png"), full_page=True)

    def fill(self, field, value):
        box = self.pg.locator(f"#field-{field} input, #field-{field} textarea").first
        box.fill(str(value))
        box.press("Tab")

    def choose(self, field, text):
        box = self.pg.locator(f"#field-{field} input").first
        box.click()
        box.fill(text)
        box.press("Enter")
        self.pg.keyboard.press("Escape")

    def wait(self, js: str, timeout: int = 180_000) -> None:
        """wait_for_function, with a screenshot of the page when it times out."""
        try:
            self.pg.wait_for_function(js, timeout=timeout)
        except Exception:
            self.shot("timeout")
            raise

    def progress(self, attr):
        return self.pg.locator("#run-progress").get_attribute(attr)

    def message(self):
        return self.pg.locator("#train-message").inner_text()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.mark.slow
def test_five_sessions_share_one_run_and_none_blocks_another(server, browser, tmp_path):
    from core.events import read_status
    from webui.runner import group_alive

    shots = tmp_path / "screens"
    s = [Session(browser, server, shots, i) for i in range(SESSIONS)]
    a = s[0]
    # session 0 sets up a long run, with a hub token typed into the form
    a.choose("model", server["model"])
    a.pg.locator("#field-finetuning_type input").first.click()
    a.pg.get_by_role("option", name="lora", exact=True).click()
    a.choose("chat_template", "chatml")
    for field, value in [("max_samples", 8), ("epochs", 400), ("gradient_accumulation", 1), ("lr", 0.01)]:
        a.fill(field, value)
    a.pg.locator("#acc-checkpoint").click()
    a.fill("logging_steps", 1)  # every step on the curve: the monitors move at once
    a.pg.locator("#acc-hub").click()
    a.pg.locator("#field-token input").fill(TOKEN)
    a.pg.locator("#btn-preview-cmd").click()
    a.wait("document.querySelector('#command').innerText.includes('--token')")
    assert "--token '***'" in a.pg.locator("#command").inner_text()
    assert "token" not in a.pg.locator("#run-yaml").inner_text().replace("add_eos_token", "")
    a.pg.locator("#btn-export-yaml").click()
    a.pg.locator("#export-yaml-file a").first.wait_for()
    a.pg.locator("#btn-start").click()
    a.pg.wait_for_selector("#started")
    run_dir = Path(a.pg.locator("#started").inner_text().split()[-1])
    assert server["runs"] in run_dir.parents

    # every session sees the same running job, without having started it
    for x in s:
        x.wait("document.querySelector('#run-progress').dataset.state === 'running' && "
                               "Number(document.querySelector('#run-progress').dataset.step) >= 1", timeout=180_000)
        assert str(run_dir) in x.pg.locator("#run-progress").inner_text()

    # a second Start (another session, other settings) is refused and names the active run
    b = s[1]
    b.fill("epochs", 2)
    b.pg.locator("#btn-start").click()
    b.wait("document.querySelector('#train-message').innerText.includes('already active')")
    assert str(run_dir) in b.message()
    assert sorted(p.name for p in server["runs"].iterdir() if not p.name.startswith(".")) == [run_dir.name]

    # chat in a third session answers while the run trains (its own queue slots, its own worker)
    c = s[2]
    c.pg.get_by_role("tab", name="Chat").click()
    c.choose("model", server["model"])
    c.choose("chat_template", "chatml")
    c.pg.locator("#btn-chat-load").click()
    c.pg.wait_for_selector("#chat-loaded", timeout=180_000)
    step_before = int(a.progress("data-step"))
    c.pg.locator("#chat-input textarea").fill("Who are you?")
    c.pg.locator("#btn-chat-send").click()
    # the reply's row appears first and its text streams in after: wait for the text
    c.wait("document.querySelectorAll('#chat-bot .message-row').length >= 2 && "
           "document.querySelectorAll('#chat-bot .message-row')[1].innerText.trim().length > 0", timeout=180_000)
    assert c.pg.locator("#chat-bot .message-row").nth(1).inner_text().strip()
    c.shot("chat-while-training")
    assert read_status(run_dir)["state"] == "running"
    # ...and the monitors kept moving meanwhile, in every session
    for x in s:
        x.wait(f"Number(document.querySelector('#run-progress').dataset.step) > {step_before}",
                               timeout=120_000)

    # misuse from the fourth and fifth sessions: paths out of their roots are refused with a message
    d = s[3]
    d.fill("project_name", "../escape")
    d.pg.locator("#btn-start").click()
    d.wait("document.querySelector('#train-message').innerText.includes('outside')")
    assert "--runs-dir" in d.message() and not (server["runs"].parent / "escape").exists()
    e = s[4]
    e.pg.get_by_role("tab", name="Datasets").click()
    ddir = e.pg.locator("#ds-data-dir textarea, #ds-data-dir input").first
    ddir.fill("/tmp")
    ddir.press("Tab")
    e.wait("document.querySelector('#ds-message').innerText.includes('outside')")
    ddir.fill(str(server["data"]))
    ddir.press("Tab")
    # an upload lands in the data directory, and only there (Gradio's temp copy is removed)
    upload = tmp_path / "uploaded_set.jsonl"
    upload.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n", encoding="utf-8")
    e.pg.locator("#ds-upload input[type=file]").set_input_files(str(upload))
    e.wait("document.querySelector('#ds-file-name textarea, #ds-file-name input').value "
                           "=== 'uploaded_set.jsonl'")
    assert (server["data"] / "uploaded_set.jsonl").read_bytes() == upload.read_bytes()
    copies = [p for p in server["root"].rglob("uploaded_set.jsonl") if p.parent != server["data"]]
    assert copies == [], copies
    name = e.pg.locator("#ds-name input")
    name.fill("evil")
    name.press("Enter")
    fname = e.pg.locator("#ds-file-name textarea, #ds-file-name input").first
    fname.fill("../../../etc/passwd")
    e.pg.locator("#btn-ds-save").click()
    e.wait("document.querySelector('#ds-message').innerText.includes('passwd')")
    assert "evil" not in json.loads((server["data"] / "dataset_info.json").read_text())
    e.shot("refused")

    # the token: nowhere in any session's page (previews, YAML, log box, messages included)
    a.wait("document.querySelector('#log-tail textarea').value.length > 0")
    pages = [x.pg.content() for x in s]
    assert all(TOKEN not in html for html in pages)
    assert all(TOKEN not in x.pg.evaluate("document.body.innerText") for x in s)
    assert "--token" in pages[0]  # the command preview is part of what was searched

    # any session can abort; all of them see it
    s[4].pg.get_by_role("tab", name="Train").click()
    pid = read_status(run_dir)["pid"]
    s[4].pg.locator("#btn-abort").click()
    for x in s:
        x.wait("document.querySelector('#run-progress').dataset.state === 'aborted'",
                               timeout=120_000)
    deadline = time.time() + 30
    while group_alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not group_alive(pid)
    hits = [str(p) for p in server["runs"].rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert hits == [], hits
    assert TOKEN not in (server["root"] / "ui.log").read_text(errors="replace")
    for x in s:
        x.ctx.close()
