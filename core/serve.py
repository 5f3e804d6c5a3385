"""`aitraining api`: an OpenAI-compatible server over a model (+ adapter), with FastAPI + uvicorn.

    aitraining api --model ./models/my-run [--adapter DIR] [--template gemma] [--api-key KEY]
                   [--host 127.0.0.1] [--port 8000]

    GET  /v1/models              the one model served
    POST /v1/chat/completions    OpenAI chat completions; "stream": true answers with SSE chunks

Generation is core/chat.py's ChatEngine: the model lives in its worker process, prompts are
rendered with the template the run trained with, and replies stop at its end-of-turn. Requests
are answered one at a time (one model, one worker). Listens on 127.0.0.1 unless --host says
otherwise; with an API key (--api-key or AITRAINING_API_KEY) every request needs
`Authorization: Bearer <key>` and gets 401 without it.
"""

import json
import logging
import os
import secrets
import time
import uuid
from typing import Any, Optional

from core.errors import UserError

log = logging.getLogger("aitraining.api")


def create_app(engine, model_name: str, api_key: Optional[str] = None):
    """The FastAPI app answering with `engine` (a loaded ChatEngine) under the id `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="aitraining OpenAI-compatible API", docs_url=None, redoc_url=None)
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                            status_code=status)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), api_key.encode()):
                return error(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                             "authentication_error", "invalid_api_key")
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "aitraining"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "The request body is not valid JSON")
        try:
            req = _parse(body)
        except UserError as e:
            return error(400, str(e))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        if req.pop("stream"):
            return StreamingResponse(_sse(engine, req, cid, now, model_name), media_type="text/event-stream")
        try:
            # generation blocks: run it off the event loop so /v1/models and auth stay responsive
            text = await run_in_threadpool(engine.reply, req.pop("messages"), **req)
        except UserError as e:
            return error(400, str(e))
        except RuntimeError as e:
            return error(500, str(e), "server_error")
        stats = engine.last_stats or {}
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": _finish(stats)}],
                "usage": _usage(stats)}

    return app


def _parse(body: Any) -> dict:
    """An OpenAI request body -> ChatEngine.stream keywords (+ "messages", "stream")."""
    if not isinstance(body, dict):
        raise UserError("The request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError("'messages' must be a non-empty list of {role, content}")
    if body.get("n", 1) != 1:
        raise UserError("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    return dict(messages=messages, stream=bool(body.get("stream")), max_new_tokens=int(max_tokens),
                temperature=1.0 if temperature is None else float(temperature),
                top_p=1.0 if top_p is None else float(top_p), seed=body.get("seed"))


def _finish(stats: dict) -> str:
    return "length" if stats.get("reason") == "length" else "stop"


def _usage(stats: dict) -> dict:
    p, c = int(stats.get("prompt_tokens") or 0), int(stats.get("new_tokens") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(engine, req: dict, cid: str, now: int, model_name: str):
    """Server-sent events: a role chunk, content deltas, a finish chunk, then [DONE]."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    try:
        for text in engine.stream(req.pop("messages"), **req):
            if text.startswith(sent) and len(text) > len(sent):
                yield chunk({"content": text[len(sent):]})
                sent = text
    except (UserError, RuntimeError) as e:
        err = {"error": {"message": str(e), "type": "server_error"}}
        yield f"data: {json.dumps(err)}\n\n"
        return
    stats = engine.last_stats or {}
    final = stats.get("text", sent)
    if final.startswith(sent) and len(final) > len(sent):
        yield chunk({"content": final[len(sent):]})
    yield chunk({}, _finish(stats), usage=_usage(stats))
    yield "data: [DONE]\n\n"


def api_parser():
    import argparse

    p = argparse.ArgumentParser(prog="aitraining api", description="Serve a model with an OpenAI-compatible "
                                "API: /v1/chat/completions (streaming and not) and /v1/models.")
    p.add_argument("--model", help="Model: a run directory, merged or model directory, hub/packaged id, or an "
                   "adapter directory (its base is read from adapter_config.json)")
    p.add_argument("--adapter", help="A LoRA adapter (or LoRA run directory) to put on --model")
    p.add_argument("--template", "--chat-template", dest="template", default=None,
                   help="Chat template (default: the tokenizer's own, i.e. the one the run trained with)")
    p.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (default: "
                   "$AITRAINING_API_KEY; none: no key)")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="Port (default: 8000)")
    p.add_argument("--served-model-name", default=None, help="Model id shown in /v1/models (default: the "
                   "model's directory name)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"], help="Weights dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model repository's own code")
    return p


def main(argv) -> int:
    from pathlib import Path

    ns = api_parser().parse_args(argv)
    if not (ns.model or ns.adapter):
        raise UserError("aitraining api needs --model (or --adapter). Example: aitraining api --model "
                        "./models/my-run")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("aitraining api needs FastAPI and uvicorn: pip install fastapi uvicorn") from None
    from core.chat import ChatEngine

    api_key = ns.api_key or os.environ.get("AITRAINING_API_KEY") or None
    if ns.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {ns.host} without --api-key: anyone who reaches this port can use "
              "the model", flush=True)
    engine = ChatEngine()
    info = engine.load(ns.model, ns.adapter, ns.template, ns.dtype, device=ns.device,
                       trust_remote_code=ns.trust_remote_code)
    name = ns.served_model_name or Path(str(ns.adapter or ns.model).rstrip("/")).name
    print(f"aitraining api: {name} (template {info.get('template')}, {info.get('device')}, "
          f"{info.get('dtype')}) on http://{ns.host}:{ns.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    try:
        uvicorn.run(create_app(engine, name, api_key), host=ns.host, port=ns.port, log_level="warning")
    finally:
        engine.unload()
    return 0
