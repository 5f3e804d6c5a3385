"""`aitraining`: the command line, generated from core/params.py.

    aitraining llm --train --model M --data-path D --project-name P [--peft ...]
    aitraining llm --trainer dpo --help        # the groups that trainer uses
    aitraining --config run.yaml               # replay a run file (seed 004 shape)
    aitraining llm --train --config run.yaml --lr 1e-4   # a run file plus overrides
    aitraining export --model RUN_DIR --output DIR [--gguf f16] [--push-to-hub ...]
    aitraining api --model RUN_DIR [--api-key KEY] [--port 8000]   # OpenAI-compatible server
    aitraining env                              # versions, devices, accelerate env

User errors print one paragraph and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from typing import Any, Optional, Sequence

from core.errors import UserError
from core.params import GROUPS, LLMTrainingParams, TRAINER_STAGE, field_meta, fields_in_group, groups_for


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_type(name: str) -> Any:
    """The field's annotation without Optional."""
    ann = LLMTrainingParams.model_fields[name].annotation
    if typing.get_origin(ann) is typing.Union:
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    return ann


def _arg_spec(name: str) -> dict[str, Any]:
    """argparse keywords for one schema field, from its annotation."""
    field = LLMTrainingParams.model_fields[name]
    ann = _plain_type(name)
    args = typing.get_args(ann)
    default = field.default
    help_text = field.description or ""
    if default is not None and not field_meta(name).get("secret"):
        shown = default.get_secret_value() if hasattr(default, "get_secret_value") else default
        help_text += f" (default: {shown})"
    spec: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": name}
    if ann is bool:
        spec["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(ann) is typing.Literal:
        spec["choices"] = list(args) + (["none"] if field.default is None or type(None) in
                                        typing.get_args(field.annotation) else [])
        spec["metavar"] = "{" + ",".join(map(str, args)) + "}"
    elif ann is int:
        spec["type"] = int
    elif ann is float:
        spec["type"] = float
    elif typing.get_origin(ann) is dict:
        spec["type"] = _json_dict
        spec["metavar"] = "JSON"
    else:
        spec["type"] = str
    return spec


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object like {"prompt": "question"}')
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a hint for flag names other trainers use (--learning-rate -> --lr)."""

    def error(self, message: str):
        from core.config_io import OTHER_NAMES

        for name, ours in OTHER_NAMES.items():
            if f"--{name.replace('_', '-')}" in message.split(": ", 1)[-1].split():
                message += f" (did you mean --{ours.replace('_', '-')}?)"
                break
        else:
            if message.startswith("unrecognized arguments"):
                message += " (`aitraining llm --help` lists the flags)"
        super().error(message)


def llm_parser(trainer: Optional[str] = None) -> argparse.ArgumentParser:
    """The `aitraining llm` parser; with a trainer, --help shows only the groups it uses."""
    parser = _Parser(
        prog="aitraining llm", usage="aitraining llm --train [--trainer T] [options]", allow_abbrev=False,
        description="Train a language model."
        + (f" Parameters for --trainer {trainer}." if trainer else ""))
    parser.add_argument("--train", action="store_true", help="Start training")
    parser.add_argument("--config", help="Read parameters from a run YAML; flags override it")
    parser.add_argument("--dry-run", action="store_true",
                        help="Validate, write <project>/config.yaml and print it; do not train")
    shown = set(groups_for(trainer)) if trainer in TRAINER_STAGE else set(GROUPS)
    for group, (title, _) in GROUPS.items():
        g = parser.add_argument_group(title)
        for name in fields_in_group(group):
            spec = _arg_spec(name)
            if group not in shown:
                spec["help"] = argparse.SUPPRESS
            flags = [_flag(name)] + [_flag(a) for a in field_meta(name).get("aliases", [])]
            g.add_argument(*flags, **spec)
    return parser


def parse_llm(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse `aitraining llm` arguments; returns (options, explicitly given parameters)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--trainer")
    known, _ = pre.parse_known_args(argv)
    ns = llm_parser(known.trainer).parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if k not in ("train", "config", "dry_run")}
    for k, v in list(given.items()):
        if v == "none" and "none" not in typing.get_args(_plain_type(k)):
            given[k] = None  # `--mixed-precision none` spells an unset optional choice
    return ns, given


def to_cli_args(params: LLMTrainingParams) -> list[str]:
    """The `aitraining llm --train ...` arguments that rebuild these parameters (non-defaults only).
    Secrets are shown as *** so the line can be displayed and logged."""
    args = ["--train"]
    for name, field in LLMTrainingParams.model_fields.items():
        value = getattr(params, name)
        if value == field.default or (name == "peft" and params.finetuning_type == "lora"):
            continue
        if name == "finetuning_type" and value == "lora":
            args.append("--peft")
            continue
        flag = _flag(name)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            args += [flag, "none"]
        elif field_meta(name).get("secret"):
            args += [flag, "***"]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value, ensure_ascii=False)]
        else:
            args += [flag, str(value)]
    return args


def command_line(params: LLMTrainingParams) -> str:
    """A copy-pasteable shell line for these parameters."""
    import shlex

    return "aitraining llm " + " ".join(shlex.quote(a) for a in to_cli_args(params))


def make_params(config: Optional[str], given: dict[str, Any]) -> LLMTrainingParams:
    from core import config_io

    if config:
        base = config_io.load(config)
        merged = {**base.model_dump(exclude_unset=False), **given}
        # --peft/--finetuning-type given on the command line replace the file's pair
        if "peft" in given and "finetuning_type" not in given:
            merged.pop("finetuning_type")
        if "finetuning_type" in given and "peft" not in given:
            merged.pop("peft")
        return config_io.build(merged, f"{config} + command line")
    return config_io.build(given, "command line")


def cmd_llm(argv: Sequence[str]) -> int:
    ns, given = parse_llm(argv)
    from core.redaction import register

    register(given.get("token"))
    params = make_params(ns.config, given)
    register(params.token)  # a token from the run YAML
    from core.project import Project

    project = Project(params)
    if ns.dry_run:
        path = project.write_config()
        project.report()
        sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    if not ns.train:
        print("Nothing to do: add --train to start training (or --dry-run to check the config, "
              "--help for the flags).", file=sys.stderr)
        return 2
    return project.create(report=True)


def export_parser() -> argparse.ArgumentParser:
    from core.model.gguf_export import OUTTYPES

    p = argparse.ArgumentParser(
        prog="aitraining export", allow_abbrev=False,
        description="Merge a LoRA adapter into its base (or re-save a model) as safetensors shards; "
                    "optionally quantize (bitsandbytes), write GGUF + an Ollama Modelfile, push to the hub.")
    p.add_argument("--model", help="A model directory / hub id, or a LoRA run / adapter directory "
                   "(merged into its base)")
    p.add_argument("--adapter", help="A LoRA adapter or run directory to merge into --model (default base: "
                   "the adapter's own)")
    p.add_argument("--output", "-o", help="Output directory (default: <model or adapter>/exported)")
    p.add_argument("--max-shard-size", default="2GB", help="Largest safetensors shard, e.g. 500MB, 2GB "
                   "(default: 2GB)")
    p.add_argument("--device", default="cpu", help="Where to merge: cpu (default), cuda, cuda:1, auto")
    p.add_argument("--quantization", choices=["int8", "int4"], help="Save int8 / int4 (NF4) weights through "
                   "bitsandbytes")
    p.add_argument("--gguf", metavar="TYPES", help=f"Also write GGUF files, comma-separated types from "
                   f"{', '.join(OUTTYPES)} (llama, qwen2, gemma families), plus an Ollama Modelfile")
    p.add_argument("--chat-template", help="Template for the Modelfile (default: the tokenizer's own)")
    p.add_argument("--push-to-hub", action="store_true", help="Upload the output directory to the private "
                   "repo {username}/{output name} with a model card")
    p.add_argument("--username", help="Hugging Face username (for --push-to-hub)")
    p.add_argument("--token", help="Hugging Face token (default: $HF_TOKEN); never written or logged")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model repository's own code")
    return p


def cmd_export(argv: Sequence[str]) -> int:
    from pathlib import Path

    from core.errors import ConfigError

    ns = export_parser().parse_args(argv)
    if not (ns.model or ns.adapter):
        raise ConfigError("aitraining export needs --model (a model or run directory) or --adapter")
    if ns.push_to_hub and not ns.username:
        raise ConfigError("--push-to-hub needs --username (the repo is {username}/{output name})")
    if ns.push_to_hub and not (ns.token or os.environ.get("HF_TOKEN")):
        raise ConfigError("--push-to-hub needs --token or HF_TOKEN (a write token)")
    gguf = [t.strip() for t in (ns.gguf or "").split(",") if t.strip()]
    from core.model.gguf_export import OUTTYPES

    bad = [t for t in gguf if t not in OUTTYPES]
    if bad:
        raise ConfigError(f"--gguf {','.join(bad)}: unknown output type; choose from {', '.join(OUTTYPES)}")
    out = Path(ns.output or Path(ns.adapter or ns.model) / "exported")
    device = ns.device
    if device == "auto":
        from core.model.loader import pick_device

        device = pick_device()
    from core.model.export import export_model

    written = export_model(ns.model, out, adapter=ns.adapter, max_shard_size=ns.max_shard_size, device=device,
                           quantization=ns.quantization, gguf=gguf, chat_template=ns.chat_template,
                           trust_remote_code=ns.trust_remote_code)
    print(f"exported model: {written['model']}")
    for g in written["gguf"]:
        print(f"gguf: {g}")
    if written["modelfile"]:
        print(f"ollama Modelfile: {written['modelfile']} (ollama create NAME -f {written['modelfile']})")
    if ns.push_to_hub:
        from core.model import hub

        repo_id = hub.repo_id_for(ns.username, str(out.resolve()))
        card = hub.model_card(repo_id, base_model=ns.model, chat_template=ns.chat_template)
        print(f"pushed: {hub.push_folder(out, repo_id, token=ns.token, private=True, card=card)}")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aitraining eval", allow_abbrev=False,
        description="Generate answers for a dataset's prompts with a model (and adapter), score them "
                    "against the dataset's answers, and write predictions.jsonl and eval_results.json.")
    p.add_argument("--model", help="base model (directory, hub id, packaged id); optional with --adapter")
    p.add_argument("--adapter", help="a LoRA run directory or adapter folder")
    p.add_argument("--data-path", required=True, help="dataset name, directory or file (as for training)")
    p.add_argument("--split", default="train", help="split file inside a --data-path directory (default train)")
    p.add_argument("--dataset-dir", help="directory of dataset_info.json (default: the built-in data/)")
    p.add_argument("--chat-template", help="template name (default: the run's / the model's own)")
    p.add_argument("--metrics", default="perplexity,bleu,rouge,accuracy",
                   help="comma-separated: perplexity,bleu,rouge,accuracy (default: all)")
    p.add_argument("--max-samples", type=int, help="evaluate the first N records only")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", help="output directory (default: <adapter>/eval, else ./eval)")
    return p


def cmd_eval(argv: Sequence[str]) -> int:
    from pathlib import Path

    from core.evaluate import run_eval

    ns = eval_parser().parse_args(argv)
    out = Path(ns.output) if ns.output else (Path(ns.adapter) / "eval" if ns.adapter and Path(ns.adapter).is_dir()
                                             else Path("eval"))
    result = run_eval(model=ns.model, adapter=ns.adapter, data_path=ns.data_path, output=out,
                      metrics=ns.metrics, chat_template=ns.chat_template, split=ns.split,
                      max_samples=ns.max_samples, max_new_tokens=ns.max_new_tokens,
                      temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, batch_size=ns.batch_size,
                      seed=ns.seed, dataset_dir=ns.dataset_dir)
    print(json.dumps(result["metrics"], indent=2))
    print(f"{result['n_examples']} predictions: {out / 'predictions.jsonl'}; metrics: {out / 'eval_results.json'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="aitraining", description="LLM fine-tuning studio: CLI over the training core.",
        epilog="Commands: llm (train; see `aitraining llm --help`), eval (score a model on a dataset), "
               "webui (the web UI), export (merge, shard, quantize, GGUF, push), api (OpenAI-compatible "
               "server), env (versions, devices). `aitraining --config run.yaml` trains from a run file.")
    top.add_argument("--config", help="Train from a run YAML (task/base_model/data/params/hub)")
    top.add_argument("command", nargs="?", choices=["llm", "eval", "webui", "export", "api", "env"])
    top.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        if argv and argv[0] == "llm":
            return cmd_llm(argv[1:])
        if argv and argv[0] == "export":
            return cmd_export(argv[1:])
        if argv and argv[0] == "api":
            from core.serve import main as api_main

            return api_main(argv[1:])
        if argv and argv[0] == "eval":
            return cmd_eval(argv[1:])
        if argv and argv[0] == "webui":
            from webui.app import main as webui_main  # noqa: WPS433 (optional, later issue)

            return webui_main(argv[1:])
        if argv and argv[0] == "env":
            from core.launch import env_report

            print(env_report())
            return 0
        ns = top.parse_args(argv)
        if ns.config:
            return cmd_llm(["--train", "--config", ns.config, *ns.rest])
        top.print_help()
        return 0
    except UserError as e:
        from core.redaction import redact

        print(f"error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
