"""The web UI's translations (webui/locales/*.yaml, webui/i18n.py).

Tests run i18n in strict mode: a missing or broken string raises KeyError here instead of
falling back to English (the runtime behaviour, tested at the bottom), so gaps are caught in CI
and never shown to users.
"""
import ast
import logging
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from core.params import GROUPS, LLMTrainingParams
from webui import i18n
from webui.i18n import LANGS, catalog, field_info, field_label, group_title, placeholders, t

REPO = Path(__file__).resolve().parent.parent
FIELDS = LLMTrainingParams.model_fields
TRANSLATED = [lang for lang in LANGS if lang != "en"]


def _diff(have, want) -> dict:
    """Keys missing from / extra in `have` compared with `want` (empty when they match)."""
    out = {"missing": sorted(set(want) - set(have)), "extra": sorted(set(have) - set(want))}
    return {k: v for k, v in out.items() if v}


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    monkeypatch.setattr(i18n, "STRICT", True)


def test_one_file_per_language():
    assert list(LANGS) == ["en", "pt", "zh"]
    assert sorted(p.stem for p in i18n.LOCALES_DIR.glob("*.yaml")) == sorted(LANGS)
    for lang in LANGS:
        raw = yaml.safe_load((i18n.LOCALES_DIR / f"{lang}.yaml").read_text(encoding="utf-8"))
        assert sorted(raw) == sorted(i18n.SECTIONS), lang
        assert catalog(lang) is catalog(lang)  # parsed once


# --- fields -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", LANGS)
def test_every_field_has_a_label(lang):
    entries = catalog(lang)["fields"]
    assert not _diff(entries, FIELDS), f"{lang}.yaml fields vs LLMTrainingParams: {_diff(entries, FIELDS)}"
    for name, entry in entries.items():
        assert isinstance(entry, dict) and set(entry) <= {"label", "info"}, (lang, name)
        assert isinstance(entry.get("label"), str) and entry["label"].strip(), (lang, name)
        assert field_label(name, lang) == entry["label"]


def test_english_help_is_the_schema_description():
    for name, f in FIELDS.items():
        assert "info" not in catalog("en")["fields"][name], f"{name}: en help comes from core/params.py"
        assert field_info(name, "en") == f.description
    assert field_label("lr", "en") == "Learning rate"
    assert field_label("lora_r", "en") == "LoRA rank"


@pytest.mark.parametrize("lang", TRANSLATED)
def test_every_field_has_translated_help(lang):
    for name, f in FIELDS.items():
        info = catalog(lang)["fields"].get(name, {}).get("info")
        assert isinstance(info, str) and info.strip(), (lang, name)
        assert info != f.description, f"{lang}: {name} help is not translated"
        assert field_info(name, lang) == info


def _literal_choices(name):
    out = []
    for ann in (FIELDS[name].annotation, *typing.get_args(FIELDS[name].annotation)):
        if typing.get_origin(ann) is typing.Literal:
            out += [v for v in typing.get_args(ann) if isinstance(v, str)]
    return out


def _kept_words(name):
    """What a translation must keep verbatim: flags, {placeholders} and choice values."""
    desc = FIELDS[name].description
    words = set(re.findall(r"--[a-z0-9-]+", desc)) | set(re.findall(r"\{[^{}]*\}", desc))
    words |= {c for c in _literal_choices(name) if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", desc)}
    return words


@pytest.mark.parametrize("lang", TRANSLATED)
def test_help_keeps_flags_placeholders_and_choices(lang):
    problems = []
    for name in FIELDS:
        info = field_info(name, lang)
        for word in _kept_words(name):
            if not re.search(rf"(?<![A-Za-z0-9_-]){re.escape(word)}(?![A-Za-z0-9_-])", info):
                problems.append(f"{name}: {word!r}")
    assert not problems, f"{lang}: {problems}"


# --- groups -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", LANGS)
def test_every_group_has_a_title(lang):
    titles = catalog(lang)["groups"]
    assert not _diff(titles, GROUPS), f"{lang}.yaml groups vs core.params.GROUPS: {_diff(titles, GROUPS)}"
    for group in GROUPS:
        assert isinstance(titles[group], str) and titles[group].strip()
        assert group_title(group, lang) == titles[group]


def test_english_group_titles_match_the_schema():
    assert {g: group_title(g, "en") for g in GROUPS} == {g: title for g, (title, _) in GROUPS.items()}


# --- ui strings -------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", TRANSLATED)
def test_ui_strings_and_placeholders_match_english(lang):
    en, other = catalog("en")["ui"], catalog(lang)["ui"]
    assert not _diff(other, en), f"{lang}.yaml ui vs en.yaml: {_diff(other, en)}"
    wrong = {k: (placeholders(en[k]), placeholders(other[k])) for k in en
             if placeholders(en[k]) != placeholders(other[k])}
    assert not wrong, f"{lang}: placeholders differ: {wrong}"


@pytest.mark.parametrize("lang", LANGS)
def test_every_ui_string_formats(lang):
    for key, text in catalog(lang)["ui"].items():
        assert isinstance(text, str) and text.strip(), (lang, key)
        out = t(key, lang, **{p: "X" for p in placeholders(text)})
        assert "{" not in out and "}" not in out, (lang, key, out)


def test_t_formats():
    assert t("step", "en", step=3, total=10) == "Step 3/10"
    assert t("step", "pt", step=3, total=10) == "Passo 3/10"
    assert t("step", "zh", step=3, total=10) == "第 3/10 步"
    assert t("status_failed", "zh", error="OOM") == "失败：OOM"
    assert t("err_busy", "pt", run="runs/a") == ("Já existe uma execução ativa (runs/a). "
                                                "Interrompa-a ou aguarde até que termine.")
    assert t("btn_resume", "en") == "Resume from {checkpoint}"  # no values: the raw template
    assert t("lang") == "Language"


def test_language_codes_are_normalized():
    assert t("lang", "pt-BR") == "Idioma"
    assert t("lang", "zh_CN") == "语言"
    assert t("lang", "fr") == t("lang", None) == "Language"


def test_unknown_keys_raise():
    for lang in LANGS:
        with pytest.raises(KeyError):
            t("no_such_string", lang)
        with pytest.raises(KeyError):
            field_label("no_such_field", lang)
        with pytest.raises(KeyError):
            field_info("no_such_field", lang)
        with pytest.raises(KeyError):
            group_title("no_such_group", lang)
    with pytest.raises(KeyError):  # a placeholder value the caller forgot
        t("step", "en", step=1)


# function name -> (kind of key, position of the key argument); UI.text(component, key, attr)
_I18N_CALLS = {"t": ("ui", 0), "text": ("ui", 1), "field_label": ("field", 0), "field_info": ("field", 0),
               "group_title": ("group", 0)}


def _i18n_calls():
    """(file:line, kind, key, values given) for each literal key the web UI code uses.

    values given: the keyword names passed to t(), an empty set for UI.text (shown unformatted),
    None when not checkable (**values) or when t() returns the raw template.
    """
    for path in sorted((REPO / "webui").rglob("*.py")):
        if path.name == "i18n.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in _I18N_CALLS or (name == "text" and not isinstance(node.func, ast.Attribute)):
                continue
            kind, pos = _I18N_CALLS[name]
            arg = node.args[pos] if len(node.args) > pos else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                continue
            if name == "text":
                kw = set()
            elif not node.keywords or any(k.arg is None for k in node.keywords):
                kw = None
            else:
                kw = {k.arg for k in node.keywords}
            yield f"{path.relative_to(REPO)}:{node.lineno}", kind, arg.value, kw


def test_ui_code_uses_only_known_strings():
    problems = []
    for where, kind, key, kw in _i18n_calls():
        known = {"ui": catalog("en")["ui"], "field": FIELDS, "group": GROUPS}[kind]
        if key not in known:
            problems.append(f"{where}: unknown {kind} string {key!r}")
        elif kind == "ui" and kw is not None and kw != placeholders(known[key]):
            problems.append(f"{where}: {key!r} takes {sorted(placeholders(known[key]))}, given {sorted(kw)}")
    assert not problems, "\n".join(problems)


def test_i18n_does_not_import_gradio():
    code = "import sys, webui.i18n; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- runtime fallback -------------------------------------------------------------------------
@pytest.fixture
def partial_pt(tmp_path, monkeypatch):
    """A pt.yaml lacking some strings and with a broken placeholder; English is complete."""
    (tmp_path / "en.yaml").write_text((i18n.LOCALES_DIR / "en.yaml").read_text(encoding="utf-8"),
                                      encoding="utf-8")
    (tmp_path / "pt.yaml").write_text(yaml.safe_dump({
        "fields": {"lr": {"label": "Taxa de aprendizado"}},
        "groups": {},
        "ui": {"lang": "Idioma", "step": "Passo {passo}/{total}"},
    }, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr(i18n, "LOCALES_DIR", tmp_path)
    monkeypatch.setattr(i18n, "STRICT", False)
    monkeypatch.setattr(i18n, "_warned", set())
    i18n.catalog.cache_clear()
    yield
    i18n.catalog.cache_clear()


def test_runtime_falls_back_to_english_with_a_warning(partial_pt, caplog):
    with caplog.at_level(logging.WARNING, logger="webui.i18n"):
        assert t("lang", "pt") == "Idioma"
        assert t("btn_start", "pt") == "Start"
        assert t("btn_start", "pt") == "Start"
        assert t("step", "pt", step=1, total=2) == "Step 1/2"  # broken translation
        assert field_label("lr", "pt") == "Taxa de aprendizado"
        assert field_label("epochs", "pt") == "Epochs"
        assert field_info("lr", "pt") == FIELDS["lr"].description
        assert group_title("peft", "pt") == "PEFT / LoRA"
    warned = [r.getMessage() for r in caplog.records]
    assert len([m for m in warned if "ui.btn_start" in m]) == 1, warned  # once per string
    for where in ("ui.step", "fields.epochs.label", "fields.lr.info", "groups.peft"):
        assert any(where in m for m in warned), (where, warned)
    with pytest.raises(KeyError):  # unknown everywhere: a bug, even at runtime
        t("no_such_string", "pt")


def test_strict_mode_raises_on_missing_strings(partial_pt, monkeypatch):
    monkeypatch.setattr(i18n, "STRICT", True)
    assert t("lang", "pt") == "Idioma"
    for call in (lambda: t("btn_start", "pt"), lambda: t("step", "pt", step=1, total=2),
                 lambda: field_label("epochs", "pt"), lambda: field_info("lr", "pt"),
                 lambda: group_title("peft", "pt")):
        with pytest.raises(KeyError):
            call()
