"""Translations of the web UI: English, Portuguese (Brazil) and Simplified Chinese.

Strings live in webui/locales/<lang>.yaml, in three sections:
    fields: {name: {label, info}} for each field of core.params.LLMTrainingParams
    groups: {key: title} for each key of core.params.GROUPS
    ui:     {key: text} for the UI's own strings; {placeholders} are filled by t(key, lang, **values)
A field's English help is its `description` in core/params.py (the one source of truth), so
en.yaml has labels only; pt.yaml and zh.yaml translate both.

A string missing from pt/zh falls back to English and logs a warning once: a page with one
English label is better than a broken page. In strict mode (`STRICT = True`, or the environment
variable AITRAINING_I18N_STRICT=1; tests/test_locales.py turns it on) it raises KeyError instead.
A key that English does not know either always raises KeyError: that is a bug in the caller.
"""
from __future__ import annotations

import logging
import os
import string
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from core.params import GROUPS, LLMTrainingParams

log = logging.getLogger(__name__)

LANGS = {"en": "English", "pt": "Português (Brasil)", "zh": "简体中文"}
DEFAULT_LANG = "en"
LOCALES_DIR = Path(__file__).resolve().parent / "locales"
SECTIONS = ("fields", "groups", "ui")
STRICT = os.environ.get("AITRAINING_I18N_STRICT", "") not in ("", "0")

__all__ = ["LANGS", "DEFAULT_LANG", "normalize_lang", "catalog", "placeholders", "t", "field_label",
           "field_info", "group_title"]

_warned: set[tuple[str, str]] = set()


def normalize_lang(lang: str | None) -> str:
    """A LANGS key for a language code: 'pt-BR' -> 'pt', 'zh_CN' -> 'zh'; unknown or empty -> 'en'."""
    code = str(lang or "").replace("_", "-").split("-")[0].lower()
    return code if code in LANGS else DEFAULT_LANG


@cache
def catalog(lang: str) -> dict[str, dict[str, Any]]:
    """The strings of locales/<lang>.yaml, read once (treat the result as read-only)."""
    if lang not in LANGS:
        raise KeyError(f"unknown language {lang!r} (one of {', '.join(LANGS)})")
    path = LOCALES_DIR / f"{lang}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(data) - set(SECTIONS) if isinstance(data, dict) else {"<not a mapping>"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (expected {', '.join(SECTIONS)})")
    return {section: dict(data.get(section) or {}) for section in SECTIONS}


def placeholders(text: str) -> set[str]:
    """The {names} that str.format fills in text."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _missing(lang: str, where: str) -> None:
    """A string absent from (or broken in) <lang>.yaml: KeyError when strict, else warn once."""
    if STRICT:
        raise KeyError(f"{where} is missing or invalid in webui/locales/{lang}.yaml")
    if (lang, where) not in _warned:
        _warned.add((lang, where))
        log.warning("%s is missing or invalid in webui/locales/%s.yaml; showing English", where, lang)


def t(key: str, lang: str = DEFAULT_LANG, **fmt: Any) -> str:
    """The UI string `key` in `lang`, with its {placeholders} filled from fmt (raw when fmt is empty)."""
    english = catalog(DEFAULT_LANG)["ui"]
    if key not in english:
        raise KeyError(f"unknown UI string {key!r}: add it to every file in webui/locales/")
    lang = normalize_lang(lang)
    text = catalog(lang)["ui"].get(key)
    if text is not None and lang != DEFAULT_LANG:
        try:
            return text.format(**fmt) if fmt else text
        except (KeyError, IndexError, ValueError):  # a translation with a broken placeholder
            text = None
    if text is None:
        _missing(lang, f"ui.{key}")
    return english[key].format(**fmt) if fmt else english[key]


def _field_entry(lang: str, name: str) -> dict[str, Any]:
    if name not in LLMTrainingParams.model_fields:
        raise KeyError(f"unknown field {name!r}: not in core.params.LLMTrainingParams")
    entry = catalog(lang)["fields"].get(name)
    return entry if isinstance(entry, dict) else {}


def field_label(name: str, lang: str = DEFAULT_LANG) -> str:
    """Short widget label of a schema field (English default: 'lora_r' -> 'Lora r')."""
    lang = normalize_lang(lang)
    label = _field_entry(lang, name).get("label")
    if label is None:
        if lang != DEFAULT_LANG:
            _missing(lang, f"fields.{name}.label")
        label = _field_entry(DEFAULT_LANG, name).get("label") or name.replace("_", " ").capitalize()
    return label


def field_info(name: str, lang: str = DEFAULT_LANG) -> str:
    """Help text of a schema field: its description in English, else the translation."""
    lang = normalize_lang(lang)
    entry = _field_entry(lang, name)
    description = LLMTrainingParams.model_fields[name].description or ""
    if lang == DEFAULT_LANG:
        return description
    info = entry.get("info")
    if info is None:
        _missing(lang, f"fields.{name}.info")
        return description
    return info


def group_title(group: str, lang: str = DEFAULT_LANG) -> str:
    """Title of a help group (a key of core.params.GROUPS)."""
    if group not in GROUPS:
        raise KeyError(f"unknown group {group!r}: not in core.params.GROUPS")
    lang = normalize_lang(lang)
    title = catalog(lang)["groups"].get(group)
    if title is None:
        if lang != DEFAULT_LANG:
            _missing(lang, f"groups.{group}")
        title = catalog(DEFAULT_LANG)["groups"].get(group) or GROUPS[group][0]
    return title
