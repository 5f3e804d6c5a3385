"""Chat with a model in a worker process, streaming the reply.

    from core.chat import ChatEngine
    engine = ChatEngine()
    engine.load("./models/my-first")                 # a run dir, adapter dir, merged dir or model id
    for text in engine.stream([{"role": "user", "content": "Hi!"}], temperature=0):
        print(text)                                   # the reply so far (cumulative, as Gradio wants)
    engine.unload()                                   # ends the worker: its memory goes back to the OS

Why a worker process: Python seldom gives freed tensors back to the OS, and a CUDA context stays
until its process ends, so only ending the process frees a model for real. The worker is started
with the spawn method (safe with threads, CUDA and Gradio), loads one model, and answers requests
over a Pipe:

    UI -> worker   ("generate", id, request)   ("cancel", id)   ("exit",)
    worker -> UI   ("loaded", None, info)   ("text", id, reply so far)   ("done", id, stats)
                   ("error", id, kind, message)

Every read in the UI process waits in short polls and checks that the worker is alive, so a crash
(out of memory, a kill) becomes an error in the caller, never a hang. Loading another model starts
a new worker and ends the old one. Each ChatEngine has its own worker, so a base model and a
fine-tuned one can answer the same prompt side by side.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import threading
import time
from typing import Iterator

from core import errors
from core.errors import UserError

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting reader checks that the worker is still alive


class ChatEngine:
    """One model in one worker process. Methods may be called from any thread; requests to the same
    engine run one at a time.

    load_timeout: seconds a load may take (a packaged model's first conversion takes minutes).
    reply_timeout: seconds without any message from a working worker before giving up.
    """

    def __init__(self, *, load_timeout: float = 1800.0, reply_timeout: float = 600.0):
        self.load_timeout = load_timeout
        self.reply_timeout = reply_timeout
        self.last_stats: dict | None = None  # of the last finished reply: reason, tokens, speed
        self._proc = None
        self._conn = None
        self._info: dict | None = None
        self._lock = threading.Lock()  # one request at a time per worker
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle

    def load(self, model: str | None, adapter: str | None = None, chat_template: str | None = None,
             dtype=None, *, device: str | None = None, trust_remote_code: bool = False) -> dict:
        """Start a worker holding `model` (+ `adapter`); replaces what was loaded. Returns loaded().

        model: hub/packaged id, model dir, merged dir, run dir, or an adapter dir (its base is read
          from adapter_config.json). May be empty when `adapter` is given.
        adapter: an adapter or run directory to put on `model` (or on its own base when model is
          empty).
        chat_template: None/"auto" (the tokenizer's own, e.g. the one a run trained with, else the
          family default), "tokenizer", "none" (plain text), a template name, a .jinja path or source.
        dtype: None/"auto" (from the device), "fp32", "bf16", "fp16" or a torch dtype.
        Raises UserError (bad path, unknown template, ...) or RuntimeError (the worker failed).
        """
        if not (model or adapter):
            raise UserError("No model given. Fix: choose a model (hub id, local directory or run directory)")
        self.unload()
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        spec = dict(model=str(model) if model else None, adapter=str(adapter) if adapter else None,
                    chat_template=chat_template, dtype=dtype, device=device,
                    trust_remote_code=trust_remote_code)
        proc = ctx.Process(target=_worker_main, args=(child_conn, spec), name="aitraining-chat", daemon=True)
        proc.start()
        child_conn.close()  # only the worker holds its end now: if it dies, our reads see EOF
        self._proc, self._conn = proc, conn
        try:
            msg = _receive(proc, conn, None, self.load_timeout, f"loading {model or adapter}")
        except BaseException:
            self.unload()
            raise
        self._info = msg[2]
        return dict(self._info)

    def loaded(self) -> dict | None:
        """What is loaded: model, adapter, template (name, "tokenizer", "custom" or None), device,
        dtype, pid, memory_mb, stop_words, warnings; None when nothing is (or the worker died)."""
        if self._proc is not None and not self._proc.is_alive():
            self.unload()
        return dict(self._info) if self._info else None

    def unload(self) -> dict | None:
        """End the worker. Returns {"model", "adapter", "pid", "released_mb"} or None if nothing was
        loaded; released_mb is the worker's resident memory (plus GPU memory it held) just before."""
        proc, conn, info = self._proc, self._conn, self._info or {}
        self._proc = self._conn = self._info = None
        if proc is None:
            return None
        released = _rss_mb(proc.pid) + (info.get("gpu_mb") or 0.0)
        try:  # a clean exit first (it cancels a running generation), then the signals
            conn.send(("exit",))
            proc.join(3)
        except (OSError, ValueError):
            pass
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        conn.close()
        report = {"model": info.get("model"), "adapter": info.get("adapter"), "pid": proc.pid,
                  "released_mb": round(released, 1)}
        if info:
            log.info("chat: unloaded %s (worker %s), released about %.0f MB", info.get("model"), proc.pid, released)
        return report

    close = unload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unload()

    # ------------------------------------------------------------------ chatting

    def stream(self, messages, *, system: str | None = None, max_new_tokens: int = 256,
               temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None) -> Iterator[str]:
        """Yield the reply so far (a growing string) as tokens arrive; the last value is the reply.

        messages: [{"role": "user"|"assistant"|"system", "content": ...}] (Gradio's messages format;
          content may be a list of parts, text parts are used) or [user, assistant] pairs; the
          last one must be from the user. system: replaces a leading system message when given.
        temperature 0 is greedy decoding. The reply stops at the template's end of turn or the eos
        and never contains them. Closing the generator early cancels the generation.
        After the last value, last_stats holds {"text", "reason" ("stop"|"length"|"cancelled"),
        "new_tokens", "seconds", "tokens_per_s"}.
        """
        request = dict(messages=_normalize(messages, system), max_new_tokens=int(max_new_tokens),
                       temperature=float(temperature), top_p=float(top_p), seed=seed)
        if request["max_new_tokens"] < 1:
            raise UserError("max_new_tokens must be at least 1")
        if request["temperature"] < 0 or not 0 < request["top_p"] <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")
        with self._lock:
            proc, conn = self._proc, self._conn
            if proc is None:
                raise UserError("No model is loaded. Fix: load a model first")
            rid = next(self._ids)
            finished = False
            try:
                _send(conn, ("generate", rid, request))
                shown = None
                while True:
                    msg = _receive(proc, conn, rid, self.reply_timeout, "answering")
                    if msg[0] == "text":
                        shown = msg[2]
                        yield shown
                    elif msg[0] == "done":
                        finished = True
                        self.last_stats = msg[2]
                        if msg[2]["text"] != shown:
                            yield msg[2]["text"]
                        return
            finally:
                if not finished and proc.is_alive():
                    try:  # stop the generation we no longer read; its late messages are skipped by id
                        conn.send(("cancel", rid))
                    except (OSError, ValueError):
                        pass

    def reply(self, messages, **kwargs) -> str:
        """The whole reply at once (see stream for the arguments)."""
        text = ""
        for text in self.stream(messages, **kwargs):
            pass
        return text


def _normalize(messages, system: str | None) -> list[dict]:
    """Gradio messages or (user, assistant) pairs -> [{"role", "content": str}]."""
    out = []
    for m in messages or []:
        if isinstance(m, dict):
            role, content = m.get("role"), _text(m.get("content"))
            if role not in ("system", "user", "assistant", "tool"):
                raise UserError(f"A chat message has role {role!r}; expected user, assistant or system")
            out.append({"role": role, "content": content})
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            out += [{"role": r, "content": _text(c)} for r, c in zip(("user", "assistant"), m) if c is not None]
        else:
            raise UserError(f"A chat message must be a dict with role and content, not {m!r}")
    if system and system.strip():
        out = [{"role": "system", "content": system}] + [m for i, m in enumerate(out) if i or m["role"] != "system"]
    if not out or out[-1]["role"] != "user":
        raise UserError("The conversation must end with a user message. Fix: type a message first")
    return out


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):  # multimodal parts: keep the text ones
        return "".join(_text(p) for p in content if isinstance(p, str) or (isinstance(p, dict) and "text" in p))
    return str(content)


# ------------------------------------------------------------------ UI-process plumbing

def _send(conn, msg) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError) as e:
        raise RuntimeError("The chat worker is gone (was the model unloaded?). Fix: load the model again") from e


def _receive(proc, conn, rid, timeout: float, what: str):
    """The next message for request rid; raises the worker's error, or RuntimeError when the worker
    died or stayed silent for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ready = conn.poll(POLL_S)
            msg = conn.recv() if ready else None
        except (EOFError, OSError, ValueError):  # worker ended, or unload() closed the pipe
            proc.join(1)
            msg = None
            if proc.exitcode is None and not conn.closed:
                raise RuntimeError(f"Lost the connection to the chat worker while {what}")
        if msg is not None:
            if msg[1] != rid:
                continue  # late output of a cancelled request
            if msg[0] == "error":
                raise _error(msg[2], msg[3])
            return msg
        if conn.closed:
            raise RuntimeError(f"The model was unloaded while {what}")
        if not proc.is_alive():
            code = proc.exitcode
            why = " (killed: often the machine ran out of memory)" if code in (-9, 137) else ""
            raise RuntimeError(f"The chat worker stopped while {what} (exit code {code}){why}. "
                               "Fix: load the model again; pick a smaller model or dtype if it keeps happening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"No answer from the chat worker after {timeout:.0f} s while {what}")


def _error(kind: str, message: str) -> Exception:
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, UserError):
        return UserError(message) if cls is errors.DataError else cls(message)  # DataError wants a file
    return RuntimeError(message)


def _rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return 0.0


# ------------------------------------------------------------------ the worker process

class _Collect(logging.Handler):
    """Keeps the warnings logged while loading, so the UI can show them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _worker_main(conn, spec: dict) -> None:
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    try:
        state = _load(spec)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the UI as a message
        conn.send(("error", None, *_describe(e, f"Could not load {spec['model'] or spec['adapter']}")))
        return
    finally:
        logging.getLogger().removeHandler(collect)
    state["info"]["warnings"] = collect.messages
    conn.send(("loaded", None, state["info"]))
    pending = []
    while True:
        try:
            msg = pending.pop(0) if pending else conn.recv()
        except (EOFError, OSError):
            return  # the UI process is gone
        if msg[0] == "exit":
            return
        if msg[0] == "generate":
            try:
                _generate(conn, state, msg[1], msg[2], pending)
            except (BrokenPipeError, EOFError):
                return
            except BaseException as e:  # noqa: BLE001
                conn.send(("error", msg[1], *_describe(e, "Generation failed")))
        # a "cancel" for a request already finished needs nothing


def _describe(e: BaseException, context: str) -> tuple[str, str]:
    if isinstance(e, UserError):
        return type(e).__name__, str(e)
    text = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
    return "RuntimeError", f"{context}: {type(e).__name__}{': ' + text if text else ''}"


def _load(spec: dict) -> dict:
    import torch

    from core import templates
    from core.errors import ConfigError
    from core.model import loader

    started = time.monotonic()
    device = spec["device"] or loader.pick_device()
    dtype = spec["dtype"]
    if dtype is None or isinstance(dtype, str):
        dtype = loader.pick_dtype(None if dtype in (None, "auto") else dtype, device)
    trc = spec["trust_remote_code"]
    name, adapter = spec["model"], spec["adapter"]
    if adapter:
        src = loader.resolve_model(adapter)
        if not loader.is_adapter_dir(src):
            raise ConfigError(f"{adapter} holds no adapter (adapter_config.json). Fix: choose it as the "
                              "model instead, or pick a run trained with LoRA")
        if name:  # an explicit base: load it, then put the adapter on top
            from peft import PeftModel

            model, tok = loader.load_for_inference(name, dtype=dtype, device=device, trust_remote_code=trc)
            model = PeftModel.from_pretrained(model, src).to(device).eval()
            if any((src / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
                tok = loader.load_tokenizer(src, trust_remote_code=trc, padding_side="left")
        else:
            model, tok = loader.load_for_inference(src, dtype=dtype, device=device, trust_remote_code=trc)
            name = loader.adapter_base(src)
    else:
        src = loader.resolve_model(name)
        model, tok = loader.load_for_inference(src, dtype=dtype, device=device, trust_remote_code=trc)
        if loader.is_adapter_dir(src):  # a LoRA run directory: report its base and the adapter
            adapter, name = name, loader.adapter_base(src)

    source = templates.resolve_chat_template(spec["chat_template"], tok, getattr(model.config, "model_type", None))
    stop_words = templates._stop_words(source) if source else []
    stop_ids = templates.stop_token_ids(tok, source)
    extra = model.generation_config.eos_token_id  # e.g. Llama 3 instruct lists several
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and i not in stop_ids:
            stop_ids.append(i)
    # stop words that are not one token cannot be eos ids: generate stops on them as strings
    stop_strings = [w for w in stop_words if len(tok.encode(w, add_special_tokens=False)) != 1]
    gpu_mb = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    info = dict(model=name, adapter=str(adapter) if adapter else None,
                template=_template_name(source, tok), device=device, dtype=str(dtype).replace("torch.", ""),
                pid=mp.current_process().pid, memory_mb=round(_rss_mb(mp.current_process().pid), 1),
                gpu_mb=round(gpu_mb, 1), stop_words=stop_words, stop_token_ids=stop_ids,
                load_seconds=round(time.monotonic() - started, 2))
    return dict(model=model, tok=tok, source=source, stop_words=stop_words, stop_ids=stop_ids,
                stop_strings=stop_strings, device=device, info=info)


def _template_name(source: str | None, tok) -> str | None:
    from core import templates

    if source is None:
        return None
    for key in templates.list_templates():
        t = templates.load_template(key)
        if t.source.strip() == source.strip():
            return t.name
    own = templates._own_template(tok)
    return "tokenizer" if own and own.strip() == source.strip() else "custom"


def prompt_ids(tok, messages: list[dict], source: str | None) -> list[int]:
    """The prompt as training renders it: template text + generation prompt, tokenized without
    special tokens, with a bos in front when the tokenizer puts one before plain text."""
    from core import templates

    text = tok.apply_chat_template(messages, chat_template=source or templates.load_template("empty").source,
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    if templates._adds_bos(tok) and ids[:1] != [tok.bos_token_id]:
        ids = [tok.bos_token_id, *ids]
    return ids


def clean_reply(text: str, stop_words, *, final: bool = True) -> str:
    """Cut the reply at the first stop word; while streaming also hide a stop word's beginning."""
    for w in stop_words:
        if w in text:
            text = text[: text.index(w)]
    if not final:
        for w in stop_words:
            for k in range(len(w) - 1, 0, -1):
                if text.endswith(w[:k]):
                    return text[:-k]
    return text


def _generate(conn, state: dict, rid: int, req: dict, pending: list) -> None:
    import queue

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tok, model, stop_words, stop_ids = state["tok"], state["model"], state["stop_words"], state["stop_ids"]
    ids = prompt_ids(tok, req["messages"], state["source"])
    input_ids = torch.tensor([ids], device=state["device"])
    cancel = threading.Event()

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=POLL_S)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  max_new_tokens=req["max_new_tokens"], eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                  streamer=streamer, stopping_criteria=StoppingCriteriaList([Cancelled()]))
    if req["temperature"] > 0:
        kwargs.update(do_sample=True, temperature=req["temperature"], top_p=req["top_p"])
    else:
        kwargs.update(do_sample=False)
    if state["stop_strings"]:
        kwargs.update(stop_strings=state["stop_strings"], tokenizer=tok)
    if req.get("seed") is not None:
        torch.manual_seed(int(req["seed"]))

    result = {}

    def run():
        try:
            with torch.inference_mode():
                result["out"] = model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the worker's main thread below
            result["error"] = e
            streamer.end()

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    raw, shown = "", ""
    while True:
        try:
            raw += next(streamer)
        except StopIteration:
            break
        except queue.Empty:
            pass
        while conn.poll():  # a cancel can arrive at any time; anything else waits its turn
            msg = conn.recv()
            if msg[0] == "cancel" and msg[1] == rid:
                cancel.set()
            elif msg[0] == "exit":
                cancel.set()
                pending.append(msg)
            elif msg[0] != "cancel":
                pending.append(msg)
        text = clean_reply(raw, stop_words, final=False)
        if text != shown:
            shown = text
            conn.send(("text", rid, text))
    thread.join()
    if "error" in result:
        raise result["error"]
    new = result["out"][0, len(ids):].tolist()
    full = tok.decode(new, skip_special_tokens=True)
    if new and new[-1] in stop_ids or any(w in full for w in stop_words):
        reason = "stop"
    elif cancel.is_set():
        reason = "cancelled"
    else:
        reason = "length"
    seconds = time.monotonic() - started
    conn.send(("done", rid, dict(text=clean_reply(full, stop_words), reason=reason, new_tokens=len(new),
                                 prompt_tokens=len(ids),
                                 seconds=round(seconds, 3), tokens_per_s=round(len(new) / max(seconds, 1e-9), 1))))
