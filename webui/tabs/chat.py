"""Chat tab: talk to the model of the top bar with the chosen adapter (or a run's merged model),
streaming; side by side, the base model answers the same prompt. Models live in worker
processes (core/chat.py) so Unload really frees their memory."""
from __future__ import annotations

import html

import gradio as gr

from core.chat import ChatEngine
from core.errors import UserError
from core.redaction import redact
from webui.i18n import t

# One pair of engines per browser session: sessions never wait on each other's chat.
_ENGINES: dict[str, dict[str, ChatEngine]] = {}


def engines(request: gr.Request | None) -> dict[str, ChatEngine]:
    key = request.session_hash if request is not None else "default"
    return _ENGINES.setdefault(key, {"tuned": ChatEngine(), "base": ChatEngine()})


def build(ui) -> None:
    with gr.Row():
        b_load = ui.text(gr.Button("Load model", variant="primary", elem_id="btn-chat-load"), "chat_load", "value")
        b_unload = ui.text(gr.Button("Unload model", elem_id="btn-chat-unload"), "chat_unload", "value")
        side = ui.text(gr.Checkbox(value=False, elem_id="chat-side-by-side"), "side_by_side")
    status = gr.HTML(elem_id="chat-status")
    with gr.Row():
        base_bot = ui.text(gr.Chatbot(visible=False, elem_id="chat-base", height=360), "base_model_reply")
        bot = ui.text(gr.Chatbot(elem_id="chat-bot", height=360), "tuned_reply")
    with gr.Row():
        system = ui.text(gr.Textbox(lines=2, elem_id="chat-system"), "system_prompt")
        with gr.Column():
            max_new = ui.text(gr.Slider(8, 2048, value=256, step=8, elem_id="chat-max-new"), "max_new_tokens")
            temp = ui.text(gr.Slider(0, 2, value=0.7, step=0.05, elem_id="chat-temperature"), "temperature")
            top_p = ui.text(gr.Slider(0.05, 1, value=0.9, step=0.05, elem_id="chat-top-p"), "top_p")
    with gr.Row():
        box = ui.text(gr.Textbox(scale=4, elem_id="chat-input", show_label=False), "input_placeholder", "placeholder")
        b_send = ui.text(gr.Button("Send", variant="primary", elem_id="btn-chat-send", scale=1), "send", "value")
        b_clear = ui.text(gr.Button("Clear", elem_id="btn-chat-clear", scale=1), "clear", "value")

    model, adapter, template = ui.fields["model"], ui.fields["adapter_path"], ui.fields["chat_template"]

    def load(model_id, adapter_dir, template_choice, side_by_side, request: gr.Request):
        eng = engines(request)
        choice = None if template_choice in (None, "", "auto") else template_choice
        try:
            info = eng["tuned"].load(model_id, adapter_dir or None, choice)
            if side_by_side and adapter_dir:
                eng["base"].load(model_id, None, choice)
            elif eng["base"].loaded():
                eng["base"].unload()
        except (UserError, RuntimeError) as e:
            return f"<div class='error-box'>{html.escape(redact(str(e)))}</div>", gr.update(visible=side_by_side)
        what = info.get("adapter") or info.get("model")
        extra = f" · {info.get('template')} · {info.get('device')}/{info.get('dtype')}"
        return (f"<div class='ok-box' id='chat-loaded'>{html.escape(t('chat_loaded', ui.lang, model=what) + extra)}"
                "</div>", gr.update(visible=bool(side_by_side and adapter_dir)))

    b_load.click(load, [model, adapter, template, side], [status, base_bot])

    def unload(request: gr.Request):
        eng = engines(request)
        report = eng["tuned"].unload()
        eng["base"].unload()
        freed = f" ({report['released_mb']:.0f} MB)" if report else ""
        return f"<div id='chat-unloaded'>{html.escape(t('chat_unloaded', ui.lang))}{freed}</div>"

    b_unload.click(unload, None, status)

    def send(message, history, base_history, sys_prompt, n, temperature, p, request: gr.Request):
        eng = engines(request)
        history = list(history or []) + [{"role": "user", "content": message}]
        use_base = eng["base"].loaded() is not None
        base_history = list(base_history or []) + ([{"role": "user", "content": message}] if use_base else [])
        opts = dict(system=sys_prompt or None, max_new_tokens=int(n), temperature=float(temperature), top_p=float(p))
        try:
            if use_base:  # the base model answers first, then the fine-tuned one: same prompt, same settings
                for text in eng["base"].stream(base_history, **opts):
                    yield "", history, base_history + [{"role": "assistant", "content": text}], gr.skip()
                base_history = base_history + [{"role": "assistant", "content": text}]
            for text in eng["tuned"].stream(history, **opts):
                yield "", history + [{"role": "assistant", "content": text}], base_history, gr.skip()
        except (UserError, RuntimeError) as e:
            yield message, history[:-1], base_history, f"<div class='error-box'>{html.escape(redact(str(e)))}</div>"

    outs = [box, bot, base_bot, status]
    b_send.click(send, [box, bot, base_bot, system, max_new, temp, top_p], outs)
    box.submit(send, [box, bot, base_bot, system, max_new, temp, top_p], outs)
    b_clear.click(lambda: ([], []), None, [bot, base_bot])
