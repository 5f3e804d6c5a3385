"""Runs the bad-input corpus (cases.yaml) through the CLI and the web UI's handlers, and counts.

A case passes ("clear error") when the command exits with code 2, prints no traceback, its error is
one paragraph (no blank line) containing every expected substring, and no run was started (the
project directory was never created: the error came before any compute). Through the UI, a case
passes when the handler returns the red error box with the expected substrings instead of raising.

    python3 tests/corpus/harness.py      # prints the counts (the README's Reliability row)
"""
from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CASES_FILE = HERE / "cases.yaml"


def load_cases() -> list[dict]:
    return yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))["cases"]


@dataclass
class Env:
    """Where the corpus runs: the tiny model, a valid data file, a model with another vocabulary."""

    root: Path
    model: Path
    good: Path = None
    other_vocab: Path = None

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.good = self.root / "good.jsonl"
        self.good.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                                     for i in range(4)), encoding="utf-8")
        self.other_vocab = self.root / "other-vocab-model"
        if not self.other_vocab.is_dir():
            from transformers import AutoTokenizer

            self.other_vocab.mkdir()
            shutil.copy(self.model / "config.json", self.other_vocab / "config.json")
            tok = AutoTokenizer.from_pretrained(self.model)
            tok.add_tokens(["<corpus_extra_a>", "<corpus_extra_b>"])
            tok.save_pretrained(self.other_vocab)

    def subst(self, text: str, case_dir: Path, out: Path) -> str:
        for key, value in (("case", case_dir), ("model", self.model), ("out", out), ("good", self.good),
                           ("other_vocab", self.other_vocab)):
            text = text.replace("{" + key + "}", str(value))
        return text


@dataclass
class Prepared:
    case: dict
    dir: Path
    out: Path
    argv: list = field(default_factory=list)
    config: Path | None = None


def prepare(case: dict, env: Env) -> Prepared:
    """Write the case's files (and generated ones) and build its command line."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from generate import GENERATORS

    case_dir = env.root / "cases" / case["name"]
    out = env.root / "out" / case["name"]
    shutil.rmtree(case_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    case_dir.mkdir(parents=True)
    for name, text in (case.get("files") or {}).items():
        path = case_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for name, gen in (case.get("gen") or {}).items():
        GENERATORS[gen](case_dir / name)
    prep = Prepared(case, case_dir, out)
    if "config" in case:
        prep.config = case_dir / "run.yaml"
        prep.config.write_text(env.subst(case["config"], case_dir, out), encoding="utf-8")
        prep.argv = ["--config", str(prep.config)]
    elif "argv" in case:
        prep.argv = [env.subst(a, case_dir, out) for a in case["argv"]]
    else:
        base = ["llm", "--train", "--model", str(env.model), "--project-name", str(out), "--log", "none"]
        prep.argv = base + [env.subst(str(a), case_dir, out) for a in case.get("args", [])]
    return prep


# ------------------------------------------------------------------------------ judging

def error_paragraph(output: str) -> str:
    """The error the user reads: from the last line holding 'error:' to the end."""
    lines = output.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if "error:" in lines[i]:
            return "\n".join(lines[i:])
    return ""


def judge(expect: list[str], rc, output: str, started: bool) -> list[str]:
    """Problems with one CLI result; [] means a clear error."""
    problems = []
    if "Traceback (most recent call last)" in output:
        problems.append("traceback")
    if rc != 2:
        problems.append(f"exit code {rc}")
    if started:
        problems.append("a run was started (the error came after the check)")
    message = error_paragraph(output)
    if not message:
        problems.append("no error message")
    elif re.search(r"\n\s*\n", message):
        problems.append("more than one paragraph")
    low = message.lower()
    missing = [s for s in expect if str(s).lower() not in low]
    if missing:
        problems.append(f"message lacks {missing}")
    return problems


# ------------------------------------------------------------------------------ the CLI

def run_cli_in_process(prep: Prepared) -> tuple[int, str]:
    from core.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        try:
            rc = main(prep.argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - exactly what the corpus must never see
            buf.write(traceback.format_exc())
            rc = 1
    return rc, buf.getvalue()


def cli_subprocesses(preps: list[Prepared]) -> dict[str, tuple[int, str]]:
    """The real `aitraining` command line, one process per case, all at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {p.case["name"]: subprocess.Popen([sys.executable, "-m", "core.cli", *p.argv], cwd=p.dir, env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in preps}
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out)
    return results


# ------------------------------------------------------------------------------ the web UI

def ui_values(prep: Prepared, env: Env) -> dict:
    """The form as a user would fill it to give this case's input."""
    from core.params import LLMTrainingParams
    from webui import form

    values = form.default_values()
    values.update(model=str(env.model), project_name=str(prep.out), log="none", data_path=[])
    names = {f"--{n.replace('_', '-')}": n for n in LLMTrainingParams.model_fields}
    names["--cutoff-len"] = "block_size"
    args = prep.argv[prep.argv.index("--log") + 2:]
    i = 0
    while i < len(args):
        flag = args[i]
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        value = args[i + 1] if takes_value else True
        i += 2 if takes_value else 1
        if flag == "--peft":
            values["finetuning_type"] = "lora"
        elif flag == "--data-path":
            values["data_path"] = [value]
        else:
            values[names[flag]] = _widget_value(names[flag], value)
    return values


def _widget_value(name: str, value):
    """A number widget holds a number: "0" typed into it arrives as 0."""
    from core.params import LLMTrainingParams

    ann = str(LLMTrainingParams.model_fields[name].annotation)
    for kind in (int, float):
        if kind.__name__ in ann and isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                return value
    return value


class UIHarness:
    """One web UI (build_app, as launch.py serves it) and its real event handlers, by elem_id."""

    def __init__(self, env: Env):
        from webui.app import build_app

        # The UI confines runs to --runs-dir and data to --data-dir: serve both from the corpus's
        # root (with the built-in datasets beside the cases), as a user would start it there.
        for f in (REPO / "data").iterdir():
            if not (env.root / f.name).exists():
                shutil.copy(f, env.root / f.name)
        self.app = build_app(env.root, "en", data_dir=env.root)
        self.handlers = {}
        for fn in self.app.fns.values():
            for block_id, event in fn.targets:
                elem = getattr(self.app.blocks.get(block_id), "elem_id", None)
                if elem:
                    self.handlers[(elem, event)] = fn.fn

    def call(self, elem: str, event: str, *args):
        return self.handlers[(elem, event)](*args)

    def start(self, values: dict):
        from webui import form

        message, _ = self.call("btn-start", "click", *[values[n] for n in form.form_fields()])
        return message

    def preview(self, values: dict):
        from webui import form

        return self.call("btn-preview", "click", 0, *[values[n] for n in form.form_fields()])

    def import_yaml(self, path: Path):
        return self.call("btn-import-yaml", "upload", str(path))[-1]


def _stop(runner) -> None:
    """Abort a run a failing case started, so the next cases are not refused as busy."""
    import time

    runner.abort(grace=5)
    deadline = time.time() + 30
    while runner.active() is not None and time.time() < deadline:
        time.sleep(0.2)


def judge_ui(expect: list[str], message) -> list[str]:
    if not isinstance(message, str) or "error-box" not in message:
        return [f"no red error box: {str(message)[:200]!r}"]
    text = html.unescape(re.sub(r"<[^>]+>", " ", message))
    missing = [s for s in expect if str(s).lower() not in text.lower()]
    return [f"UI message lacks {missing}: {text.strip()[:400]!r}"] if missing else []


def run_ui_case(ui: UIHarness, prep: Prepared, env: Env) -> tuple[list[str], bool]:
    """(problems, crashed) for one case through the UI's handlers: Import YAML for run files, Start
    for the rest, and the dataset preview for data cases."""
    case = prep.case
    expect = case.get("ui_expect", case["expect"])
    try:
        if prep.config is not None:
            return judge_ui([e for e in expect if e != "run.yaml"] + ["run.yaml"], ui.import_yaml(prep.config)), False
        values = ui_values(prep, env)
        problems = judge_ui(expect, ui.start(values))
        if prep.out.exists():
            problems.append("the UI started a run")
            _stop(ui.app.ui.runner)
        data_case = "--data-path" in prep.argv and "{good}" not in json.dumps(case.get("args", []))
        if data_case and case.get("preview", True):
            problems += [f"preview: {p}" for p in judge_ui(case.get("preview_expect", expect), ui.preview(values))]
        return problems, False
    except Exception:  # noqa: BLE001 - a handler that raises is a UI crash
        return [f"handler raised:\n{traceback.format_exc()}"], True


# ------------------------------------------------------------------------------ the whole corpus

def run_corpus(env: Env, subprocess_names: list[str] = (), ui: bool = True) -> dict:
    import time

    t0 = time.perf_counter()
    cases = load_cases()
    preps = [prepare(c, env) for c in cases if not c.get("skip")]
    report = {"cases": len(cases), "skipped": [c["name"] for c in cases if c.get("skip")], "cli": {}, "ui": {},
              "subprocess": {}}
    for prep in preps:
        rc, output = run_cli_in_process(prep)
        report["cli"][prep.case["name"]] = {"rc": rc, "problems": judge(prep.case["expect"], rc, output,
                                                                       prep.out.exists()),
                                            "message": error_paragraph(output), "traceback": "Traceback (" in output}
    report["seconds"] = {"cli": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    if subprocess_names:
        chosen = [p for p in preps if p.case["name"] in subprocess_names]
        for name, (rc, output) in cli_subprocesses(chosen).items():
            prep = next(p for p in chosen if p.case["name"] == name)
            report["subprocess"][name] = {"rc": rc, "problems": judge(prep.case["expect"], rc, output,
                                                                      prep.out.exists()),
                                          "traceback": "Traceback (" in output}
    report["seconds"]["subprocess"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    if ui:
        harness = UIHarness(env)
        for prep in preps:
            if prep.case.get("ui") is False:
                continue
            problems, crashed = run_ui_case(harness, prep, env)
            report["ui"][prep.case["name"]] = {"problems": problems, "crashed": crashed}
        # the UI still serves: a valid form previews its command after the whole corpus
        from webui import form

        values = form.default_values()
        values.update(model=str(env.model), data_path=[str(env.good)], project_name=str(env.root / "fine"))
        command, _, message = harness.call("btn-preview-cmd", "click", *[values[n] for n in form.form_fields()])
        report["ui_alive_after"] = isinstance(command, str) and command.startswith("aitraining llm") and not message
    report["seconds"]["ui"] = round(time.perf_counter() - t0, 1)
    return report


def counts(report: dict) -> dict:
    cli, ui, sub = report["cli"], report["ui"], report["subprocess"]
    return {
        "cases": report["cases"], "skipped": len(report["skipped"]), "tried": len(cli),
        "cli_clear": sum(not r["problems"] for r in cli.values()),
        "cli_tracebacks": sum(r["traceback"] for r in cli.values()) + sum(r["traceback"] for r in sub.values()),
        "subprocess_tried": len(sub), "subprocess_clear": sum(not r["problems"] for r in sub.values()),
        "ui_tried": len(ui), "ui_red": sum(not r["problems"] for r in ui.values()),
        "ui_crashes": sum(r["crashed"] for r in ui.values()),
    }


def failures(report: dict) -> list[str]:
    out = []
    for where in ("cli", "subprocess", "ui"):
        for name, r in report[where].items():
            if r["problems"]:
                out.append(f"{where} {name}: {'; '.join(r['problems'])}\n    message: {r.get('message', '')[:400]}")
    return out


SUBPROCESS_CASES = ["non_utf8_bytes", "huge_single_record", "parquet_wrong_types", "info_file_name_escapes",
                    "yaml_unknown_params_key", "unsloth_with_dpo", "unknown_cli_flag", "teacher_vocab_mismatch"]


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        rep = run_corpus(Env(Path(tmp) / "corpus", model), SUBPROCESS_CASES)
        print("\n".join(failures(rep)) or "no failures")
        print(json.dumps(counts(rep), indent=1))
