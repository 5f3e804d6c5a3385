"""The web UI (LLaMA Board style): `python launch.py` or `aitraining webui`.

Layout only: the top bar lives here, each tab in webui/tabs/. Training logic lives in core/; the
page writes a run YAML and starts the core training process through webui/runner.py.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from core import DATA_DIR
from core.model.packaged import packaged_ids
from core.templates import list_templates
from webui import form
from webui.i18n import LANGS, field_info, field_label, t
from webui.runner import Runner, list_runs

log = logging.getLogger("aitraining.webui")

# Families users pick most; any local path or hub id can be typed too.
KNOWN_MODELS = ["meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "google/gemma-2-2b-it",
                "mistralai/Mistral-7B-Instruct-v0.3", "microsoft/Phi-3-mini-4k-instruct",
                "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]
BOOSTERS = ["auto", "flashattn2", "unsloth", "liger_kernel"]
CSS = """
.error-box {color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; border-radius: 6px; padding: 6px 10px;}
.ok-box {color: #166534;}
mark.trained {background: #bbf7d0;}
.progress-outer {background:#e5e7eb;border-radius:6px;height:18px;overflow:hidden}
.progress-inner {background:#2563eb;height:18px}
"""


@dataclass
class UI:
    """What the tabs share: the runner, the field widgets and the translatable components."""

    runner: Runner
    runs_root: Path
    data_dir: Path
    lang: str = "en"
    max_upload_mb: int = 50
    upload_cache: str = ""  # Gradio's temp folder for uploads (a copy in the data dir is kept, this one goes)
    fields: dict[str, gr.Component] = field(default_factory=dict)
    extra: dict[str, gr.Component] = field(default_factory=dict)
    translations: list[tuple[gr.Component, Callable[[str], Any]]] = field(default_factory=list)

    def widget(self, name: str, **kw) -> gr.Component:
        w = form.make_widget(name, self.lang, **kw)
        self.fields[name] = w
        self.translations.append((w, lambda lang, n=name: gr.update(label=field_label(n, lang),
                                                                    info=field_info(n, lang))))
        return w

    def text(self, component: gr.Component, key: str, attr: str = "label") -> gr.Component:
        """Register a component whose `attr` shows the UI string `key` (set now, and on language change)."""
        setattr(component, attr, t(key, self.lang))
        self.translations.append((component, lambda lang: gr.update(**{attr: t(key, lang)})))
        return component

    def field_inputs(self) -> list[gr.Component]:
        return [self.fields[n] for n in form.form_fields()]

    def values(self, args) -> dict[str, Any]:
        return dict(zip(form.form_fields(), args))


def model_choices() -> list[str]:
    return packaged_ids() + KNOWN_MODELS


def adapters_for(runs_root: Path, model: Optional[str]) -> list[str]:
    """Finished runs of this model that hold an adapter (for Chat, Export and continued training)."""
    import yaml

    out = []
    for row in list_runs(runs_root):
        run = Path(row["run"])
        if not (run / "adapter_config.json").is_file():
            continue
        try:
            base = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError, AttributeError):
            continue
        if model is None or base == model:
            out.append(str(run))
    return out


def build_app(runs_root: str | os.PathLike = "runs", lang: str = "en",
              data_dir: str | os.PathLike = DATA_DIR, max_upload_mb: int = 50) -> gr.Blocks:
    from gradio.utils import get_upload_folder

    from webui.tabs import chat, datasets, evaluate, export, runs, train

    runs_root = Path(runs_root).resolve()
    runs_root.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir).resolve()
    ui = UI(runner=Runner(runs_root, data_dir), runs_root=runs_root, data_dir=data_dir, lang=lang,
            max_upload_mb=max_upload_mb, upload_cache=get_upload_folder())
    # delete_cache: Gradio's temp copies (imported YAML, exported files) go after an hour
    with gr.Blocks(title="aitraining", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        with gr.Row():
            lang_box = gr.Dropdown(choices=[(v, k) for k, v in LANGS.items()], value=lang, elem_id="lang", scale=1)
            ui.text(lang_box, "lang")
            model = ui.widget("model", choices=model_choices(), allow_custom_value=True, scale=3)
            ui.widget("finetuning_type", choices=form.METHODS, scale=1)
            adapter = ui.widget("adapter_path", choices=adapters_for(runs_root, form.LLMTrainingParams().model),
                                allow_custom_value=True, scale=3, value=None)
        with gr.Row():
            ui.widget("quantization")
            ui.widget("chat_template", choices=[form.AUTO, *list_templates(), "tokenizer", form.NONE],
                      allow_custom_value=True)
            ui.widget("rope_scaling")
            booster = ui.text(gr.Dropdown(choices=BOOSTERS, value="auto", elem_id="booster"), "booster")
        ui.extra.update(lang=lang_box, booster=booster)
        with gr.Tabs():
            with ui.text(gr.Tab("Train", id="train", elem_id="tab-train"), "tab_train"):
                train.build(ui)
            with ui.text(gr.Tab("Datasets", id="datasets", elem_id="tab-datasets"), "tab_datasets"):
                datasets.build(ui, ui.data_dir)
            with ui.text(gr.Tab("Evaluate & Predict", id="eval", elem_id="tab-eval"), "tab_eval"):
                evaluate.build(ui)
            with ui.text(gr.Tab("Chat", id="chat", elem_id="tab-chat"), "tab_chat"):
                chat.build(ui)
            with ui.text(gr.Tab("Export", id="export", elem_id="tab-export"), "tab_export"):
                export.build(ui)
            with ui.text(gr.Tab("Runs", id="runs", elem_id="tab-runs"), "tab_runs"):
                runs.build(ui)

        # The booster is a shortcut over the schema's own fields (attention, unsloth, liger): it sets
        # them, so the YAML and the CLI line show exactly what will run.
        def apply_booster(choice):
            attn = {"flashattn2": "flash_attention_2"}.get(choice, form.NONE)
            return (gr.update(value=attn), gr.update(value=choice == "unsloth"),
                    gr.update(value=choice == "liger_kernel"))

        booster.change(apply_booster, booster, [ui.fields["attn_implementation"], ui.fields["unsloth"],
                                                ui.fields["liger_kernel"]])
        model.change(lambda m: gr.update(choices=adapters_for(runs_root, m), value=None), model, adapter)
        adapter.focus(lambda m: gr.update(choices=adapters_for(runs_root, m)), model, adapter)

        def switch_language(new_lang):
            return [make(new_lang) for _, make in ui.translations]

        lang_box.change(switch_language, lang_box, [c for c, _ in ui.translations])
        on_load, load_outputs = ui.extra["on_load"]
        demo.load(on_load, None, load_outputs)
        estimate_fn, estimate_in, estimate_out = ui.extra["estimate"]
        demo.load(estimate_fn, estimate_in, estimate_out, show_progress="hidden")
    # The page is the only client: no event is a public API. (Gradio 6 embeds the API description,
    # defaults included, in the login page it serves before --auth is checked; private endpoints
    # are left out of it and cannot be called by the Gradio client libraries.)
    for fn in demo.fns.values():
        fn.api_visibility = "private"
    demo.ui = ui  # for tests and launch
    return demo


def _is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aitraining webui", description="Start the aitraining web UI.")
    p.add_argument("--host", default=os.environ.get("AITRAINING_HOST", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("AITRAINING_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="create a public Gradio share link")
    p.add_argument("--auth", help="user:password required to open the UI")
    p.add_argument("--runs-dir", default=os.environ.get("AITRAINING_RUNS", "runs"),
                   help="where runs are written and listed (default ./runs)")
    p.add_argument("--data-dir", default=os.environ.get("AITRAINING_DATA", str(DATA_DIR)),
                   help="directory holding dataset_info.json (default: the built-in data/)")
    p.add_argument("--lang", choices=list(LANGS), default="en")
    p.add_argument("--max-upload-mb", type=int, default=int(os.environ.get("AITRAINING_MAX_UPLOAD_MB", "50")),
                   help="largest file the page accepts, in MB (default 50); bigger datasets are copied "
                        "into the data directory by hand")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    auth = None
    if args.auth:
        if ":" not in args.auth:
            print("error: --auth takes user:password", file=sys.stderr)
            return 2
        auth = tuple(args.auth.split(":", 1))
    if (not _is_local(args.host) or args.share) and auth is None:
        print(f"WARNING: the UI is reachable from other machines ({'share link' if args.share else args.host}) "
              "without a password; anyone who can reach it can train and read your files. "
              "Add --auth user:password.", file=sys.stderr)
    demo = build_app(args.runs_dir, args.lang, args.data_dir, args.max_upload_mb)
    # Each event has its own limit (8 at once): chat streaming in one session never waits for the
    # monitor ticks or a Start in another. run_history=False: Gradio would otherwise keep every
    # call's inputs (the token box included) in the browser's storage.
    demo.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth, css=CSS,
        max_file_size=args.max_upload_mb * 2**20, footer_links=[], show_error=True, run_history=False)
    return 0
