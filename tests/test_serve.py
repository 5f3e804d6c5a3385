"""`aitraining api` in a real subprocess on loopback, driven by the `openai` client: /v1/models,
chat completions with and without streaming (the streamed deltas add up to the same greedy reply),
max_tokens respected, usage counted, and the API key enforced (401 without it)."""
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "sk-local-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "api", "--model", str(tiny_model_dir),
                             "--template", "chatml", "--api-key", KEY, "--port", str(port),
                             "--served-model-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            httpx.get(f"{url}/models", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not start in 300 s")
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_models_and_chat_completions_through_the_openai_client(server):
    client = openai.OpenAI(base_url=server, api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert full.usage.completion_tokens <= 6 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert choice.finish_reason == ("length" if full.usage.completion_tokens == 6 else "stop")

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 2  # it really streamed, piece by piece
    assert "".join(deltas) == choice.message.content  # greedy: same reply both ways
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong").models.list()
    r = httpx.post(f"{server}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = httpx.post(f"{server}/chat/completions", json={"messages": []},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
