"""`aitraining`: the command line, generated from core/params.py.

    aitraining llm --train --model M --data-path D --project-name P [--peft ...]
    aitraining llm --trainer dpo --help        # the groups that trainer uses
    aitraining --config run.yaml               # replay a run file (seed 004 shape)
    aitraining llm --train --config run.yaml --lr 1e-4   # a run file plus overrides

User errors print one paragraph and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
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


def llm_parser(trainer: Optional[str] = None) -> argparse.ArgumentParser:
    """The `aitraining llm` parser; with a trainer, --help shows only the groups it uses."""
    parser = argparse.ArgumentParser(
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
    params = make_params(ns.config, given)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="aitraining", description="LLM fine-tuning studio: CLI over the training core.",
        epilog="Commands: llm (train; see `aitraining llm --help`), webui (the web UI). "
               "`aitraining --config run.yaml` trains from a run file.")
    top.add_argument("--config", help="Train from a run YAML (task/base_model/data/params/hub)")
    top.add_argument("command", nargs="?", choices=["llm", "webui"])
    top.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        if argv and argv[0] == "llm":
            return cmd_llm(argv[1:])
        if argv and argv[0] == "webui":
            from webui.app import main as webui_main  # noqa: WPS433 (optional, later issue)

            return webui_main(argv[1:])
        ns = top.parse_args(argv)
        if ns.config:
            return cmd_llm(["--train", "--config", ns.config, *ns.rest])
        top.print_help()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
