"""The web UI in a real browser: Playwright driving Debian's Chromium against `launch.py`.

Three scenarios on a tiny local model: train and chat; abort a run; a malformed dataset.
Screenshots of each step land in the test's temp dir (screens/). These tests never skip:
README's test command installs Chromium when it is missing.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is not installed: run `bash scripts/install.sh` (apt-get install chromium)"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ui")
    data = root / "data"
    shutil.copytree(REPO / "data", data)  # the UI may edit dataset_info.json: never the repo's
    runs = root / "runs"
    port = free_port()
    log = open(root / "ui.log", "wb")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--port", str(port), "--runs-dir", str(runs),
                             "--data-dir", str(data)], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (root / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
    yield {"url": url, "runs": runs, "data": data, "root": root, "model": str(tiny_model_dir)}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """Small helpers over a Playwright page, with numbered screenshots."""

    def __init__(self, browser, url, shots: Path):
        self.pg = browser.new_page(viewport={"width": 1400, "height": 1600})
        self.pg.set_default_timeout(30_000)
        self.pg.goto(url)
        self.pg.wait_for_selector("#field-model input")
        self.shots, self.n = shots, 0
        shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name):
        self.n += 1
        self.pg.screenshot(path=str(self.shots / f"{self.n:02d}-{name}.png"), full_page=True)

    def type_choice(self, field, text):
        box = self.pg.locator(f"#field-{field} input").first
        box.click()
        box.fill(text)
        box.press("Enter")
        self.pg.keyboard.press("Escape")

    def pick(self, field, option):
        self.pg.locator(f"#field-{field} input").first.click()
        self.pg.get_by_role("option", name=option, exact=True).click()

    def fill(self, field, value):
        box = self.pg.locator(f"#field-{field} input, #field-{field} textarea").first
        box.fill(str(value))
        box.press("Tab")

    def state(self):
        return self.pg.locator("#run-progress").get_attribute("data-state")

    def wait_state(self, states, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.state() in states:
                return self.state()
            time.sleep(0.5)
        raise AssertionError(f"state {self.state()} after {timeout}s: {self.pg.locator('#run-progress').inner_text()}")

    def setup_run(self, model, epochs):
        self.type_choice("model", model)
        self.pick("finetuning_type", "lora")
        self.pick("chat_template", "chatml")
        self.fill("max_samples", 8)
        self.fill("epochs", epochs)
        self.fill("gradient_accumulation", 1)
        self.fill("lr", 0.01)


def test_train_watch_and_chat(server, browser, tmp_path):
    ui = Page(browser, server["url"], tmp_path / "screens")
    ui.setup_run(server["model"], 4)
    ui.shot("form")
    ui.pg.locator("#btn-preview-cmd").click()
    ui.pg.wait_for_function("document.querySelector('#command').innerText.includes('--peft')")
    command = ui.pg.locator("#command").inner_text()
    assert f"--model {server['model']}" in command and "--data-path identity" in command
    assert "task: llm-default" in ui.pg.locator("#run-yaml").inner_text()
    ui.shot("preview-command")

    ui.pg.locator("#btn-start").click()
    ui.pg.wait_for_selector("#started")
    run_dir = Path(ui.pg.locator("#started").inner_text().split()[-1])
    steps_seen = set()
    deadline = time.time() + 240
    while ui.state() != "finished" and time.time() < deadline:  # the progress bar moves
        step = ui.pg.locator("#run-progress").get_attribute("data-step")
        steps_seen.add(int(step or 0))
        assert ui.state() not in ("failed", "aborted"), ui.pg.locator("#run-progress").inner_text()
        time.sleep(0.3)
    ui.shot("finished")
    assert ui.state() == "finished"
    assert len(steps_seen) >= 2, steps_seen
    assert "Step 16/16" in ui.pg.locator("#run-progress").inner_text()
    ui.pg.wait_for_selector("#loss-plot canvas, #loss-plot svg")  # the loss curve is drawn
    assert (run_dir / "adapter_model.safetensors").is_file()
    # the run directory's config.yaml is the one the UI wrote from the form
    from core import config_io

    on_disk = config_io.load(run_dir / "config.yaml")
    assert (on_disk.model, on_disk.epochs, on_disk.finetuning_type, on_disk.chat_template) == (
        server["model"], 4, "lora", "chatml")

    ui.pg.get_by_role("tab", name="Chat").click()
    ui.type_choice("adapter_path", str(run_dir))
    ui.pg.locator("#btn-chat-load").click()
    ui.pg.wait_for_selector("#chat-loaded", timeout=120_000)
    assert "chatml" in ui.pg.locator("#chat-loaded").inner_text()
    ui.pg.locator("#chat-input textarea").fill("Who are you?")
    ui.pg.locator("#btn-chat-send").click()
    ui.pg.wait_for_function(  # the reply's row appears before its streamed text
        "document.querySelectorAll('#chat-bot .message-row').length >= 2 && "
        "document.querySelectorAll('#chat-bot .message-row')[1].innerText.trim().length > 0", timeout=120_000)
    ui.shot("chat")
    reply = ui.pg.locator("#chat-bot .message-row").nth(1).inner_text().strip()
    assert reply, "empty reply"
    ui.pg.locator("#btn-chat-unload").click()
    ui.pg.wait_for_selector("#chat-unloaded")


def test_abort_stops_every_process_and_keeps_a_checkpoint(server, browser, tmp_path):
    from core.events import read_status
    from webui.runner import group_alive

    ui = Page(browser, server["url"], tmp_path / "screens")
    ui.setup_run(server["model"], 400)
    ui.pg.locator("#btn-start").click()
    ui.pg.wait_for_selector("#started")
    run_dir = Path(ui.pg.locator("#started").inner_text().split()[-1])
    ui.pg.wait_for_function("Number(document.querySelector('#run-progress').dataset.step) >= 3", timeout=120_000)
    pid = read_status(run_dir)["pid"]
    assert group_alive(pid)
    ui.shot("running")
    ui.pg.locator("#btn-abort").click()
    ui.wait_state({"aborted"}, timeout=90)
    ui.shot("aborted")
    deadline = time.time() + 30
    while group_alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not group_alive(pid), "processes of the aborted run are still alive"
    checkpoints = list(run_dir.glob("checkpoint-*"))
    assert checkpoints and (checkpoints[0] / "trainer_state.json").is_file()
    assert read_status(run_dir)["state"] == "aborted"
    # the page offers to resume, naming the checkpoint; resuming continues from its step
    resume = ui.pg.locator("#btn-resume")
    resume.wait_for()
    assert checkpoints[0].name in resume.inner_text()
    saved_step = int(checkpoints[0].name.split("-")[1])
    resume.click()
    ui.pg.wait_for_selector("#started")
    ui.pg.wait_for_function(f"Number(document.querySelector('#run-progress').dataset.step) > {saved_step}",
                            timeout=120_000)
    ui.shot("resumed")
    ui.pg.locator("#btn-abort").click()
    ui.wait_state({"aborted"}, timeout=90)


def test_malformed_dataset_shows_numbered_errors(server, browser, tmp_path):
    bad = tmp_path / "broken_set.jsonl"
    bad.write_text("\n".join([
        json.dumps({"instruction": "hi", "output": "hello"}),
        json.dumps({"instruction": "no answer here"}),
        json.dumps({"instruction": "fine", "output": "ok"}),
        json.dumps({"instruction": "", "output": "empty question"}),
    ]) + "\n", encoding="utf-8")
    ui = Page(browser, server["url"], tmp_path / "screens")
    ui.pg.get_by_role("tab", name="Datasets").click()
    ui.pg.locator("#ds-upload input[type=file]").set_input_files(str(bad))
    ui.pg.wait_for_function("document.querySelector('#ds-file-name textarea, #ds-file-name input').value "
                            "=== 'broken_set.jsonl'")
    name = ui.pg.locator("#ds-name input")
    name.fill("broken_set")
    name.press("Enter")
    ui.pg.locator("#btn-ds-save").click()
    ui.pg.wait_for_selector("#ds-message .ok-box, #ds-message .error-box")
    ui.pg.locator("#btn-ds-validate").click()
    ui.pg.wait_for_selector("#ds-invalid")
    ui.shot("errors")
    table = ui.pg.locator("#ds-errors").inner_text()
    assert "2 errors" in ui.pg.locator("#ds-validate-summary").inner_text()
    assert "record 2" in table and "record 4" in table and "output" in table
    # the UI keeps serving: the train tab still previews a command, and the booster sets the fields
    ui.pg.get_by_role("tab", name="Train").click()
    ui.pg.locator("#booster input").click()
    ui.pg.get_by_role("option", name="flashattn2", exact=True).click()
    ui.pg.locator("#btn-preview-cmd").click()
    ui.pg.wait_for_function("document.querySelector('#command').innerText.includes('flash_attention_2')")

    # several devices: the device count is shown; GPUs, processes and the ZeRO stage are picked here
    import torch

    shown = ui.pg.locator("#device-count textarea, #device-count input").first.input_value()
    assert shown == ("CPU" if not torch.cuda.device_count() else shown) and (shown == "CPU" or " GPU: " in shown)
    ui.pick("distributed_backend", "deepspeed")
    ui.fill("devices", "0,1")
    ui.fill("deepspeed_stage", 2)
    ui.pg.locator("#btn-preview-cmd").click()
    ui.pg.wait_for_function("document.querySelector('#command').innerText.includes('--deepspeed-stage 2')")
    line = ui.pg.locator("#command").inner_text()
    assert "--distributed-backend deepspeed" in line and "--devices 0,1" in line

    # export the run YAML (download) and import it back (upload)
    ui.pg.locator("#acc-peft").click()  # the LoRA accordion
    ui.fill("lora_r", 12)
    ui.pg.locator("#btn-export-yaml").click()
    link = ui.pg.locator("#export-yaml-file a").first
    link.wait_for()
    with ui.pg.expect_download() as dl:
        link.click()
    exported = Path(dl.value.path()).read_text()
    assert "lora_r: 12" in exported and exported.startswith("task: llm-")
    edited = tmp_path / "edited.yaml"
    edited.write_text(exported.replace("lora_r: 12", "lora_r: 24"))
    with ui.pg.expect_file_chooser() as chooser:
        ui.pg.locator("#btn-import-yaml").click()
    chooser.value.set_files(str(edited))
    ui.pg.wait_for_function("document.querySelector('#field-lora_r input').value === '24'")

    # every label follows the language: Simplified Chinese, then Portuguese
    ui.pg.locator("#lang input").click()
    ui.pg.get_by_role("option", name="简体中文", exact=True).click()
    ui.pg.wait_for_function("document.querySelector('#field-model').innerText.includes('模型')")
    assert "开始" in ui.pg.locator("#btn-start").inner_text()
    ui.pg.locator("#lang input").click()
    ui.pg.get_by_role("option", name="Português (Brasil)", exact=True).click()
    ui.pg.wait_for_function("document.querySelector('#field-model').innerText.includes('Modelo')")
    ui.shot("portuguese")


@pytest.mark.slow
def test_export_tab_writes_shards_gguf_and_modelfile(server, browser, tmp_path):
    ui = Page(browser, server["url"], tmp_path / "screens")
    ui.type_choice("model", server["model"])
    ui.pg.get_by_role("tab", name="Export").click()
    out = server["runs"] / "exported"  # the UI writes only inside --runs-dir
    ui.pg.locator("#export-dir textarea, #export-dir input").first.fill(str(out))
    shard = ui.pg.locator("#export-shard input").first
    shard.fill("100KB")
    shard.press("Enter")
    ui.pg.locator("#export-gguf").get_by_role("checkbox", name="f16", exact=True).check()
    ui.shot("export-form")
    ui.pg.locator("#btn-export").click()
    ui.pg.wait_for_selector("#export-done, #export-result .error-box", timeout=180_000)
    ui.shot("export-done")
    text = ui.pg.locator("#export-result").inner_text()
    assert str(out) in text and "Modelfile" in text, text
    assert len(list(out.glob("model-*.safetensors"))) >= 2  # ~200 KB of weights in 100 KB shards
    gguf = list(out.glob("*-f16.gguf"))
    assert len(gguf) == 1 and (out / "Modelfile").read_text().startswith(f"FROM ./{gguf[0].name}")


def test_bad_input_on_start_is_a_red_message_and_the_page_keeps_working(server, browser, tmp_path):
    """Two inputs from the bad-input corpus (tests/corpus) in a real browser: a dataset with a
    Latin-1 line and a model directory without config.json. Each gives the red message naming the
    file and the fix, starts nothing, and the page goes on working."""
    import urllib.request

    from corpus.generate import latin1

    bad = server["data"] / "latin1.jsonl"  # the UI reads data only inside --data-dir
    latin1(bad)
    runs_before = sorted(server["runs"].glob("*/config.yaml"))
    ui = Page(browser, server["url"], tmp_path / "screens")
    ui.type_choice("model", server["model"])
    ui.type_choice("data_path", str(bad))
    ui.pg.locator("#btn-start").click()
    ui.pg.wait_for_selector("#train-message .error-box")
    ui.shot("bad-data-start")
    text = ui.pg.locator("#train-message").inner_text()
    assert "latin1.jsonl, record 3" in text and "not valid UTF-8" in text and "Fix: save the file as UTF-8" in text
    assert "Traceback" not in text
    # the dataset preview says the same, in red
    ui.pg.locator("#preview-acc").click()
    ui.pg.locator("#btn-preview").click()
    ui.pg.wait_for_selector("#preview-html .error-box")
    assert "record 3" in ui.pg.locator("#preview-html").inner_text()
    # a model directory without config.json: refused on Start too, before any run starts
    (tmp_path / "not-a-model").mkdir()
    ui.type_choice("model", str(tmp_path / "not-a-model"))
    ui.pg.locator("#btn-start").click()
    ui.pg.wait_for_function("document.querySelector('#train-message').innerText.includes('config.json')")
    ui.shot("bad-model-start")
    assert "not-a-model" in ui.pg.locator("#train-message").inner_text()
    assert sorted(server["runs"].glob("*/config.yaml")) == runs_before, "a run was started"
    # the page and the server keep working: the command preview answers, a new page loads
    ui.pg.locator("#btn-preview-cmd").click()
    ui.pg.wait_for_function("document.querySelector('#command').innerText.includes('not-a-model')")
    assert urllib.request.urlopen(server["url"], timeout=10).status == 200
    Page(browser, server["url"], tmp_path / "screens2").pg.close()
