"""Chat templates: pick one, render a conversation, and say which tokens are trained.

Templates are Jinja files in templates/ (HF chat-template dialect), so the same source renders
in training, in chat and in the saved tokenizer. `encode_conversation` works for any template
string, our own or a tokenizer's: it renders growing prefixes of the conversation and trains
the text each assistant message adds (its answer and end-of-turn marker).

A chat template is passed around either as one of our names ("gemma") or as Jinja source;
`None` means no template (plain text).
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from core import TEMPLATES_DIR
from core.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss default ignore_index)


@dataclass(frozen=True)
class Template:
    name: str
    source: str  # Jinja, HF chat-template dialect
    stop_words: tuple[str, ...] = ()  # strings ending an assistant turn (the eos stops too)
    model_types: tuple[str, ...] = ()  # HF model_type values defaulting to this template
    uses_bos: bool = False  # the template writes {{ bos_token }} itself
    aliases: tuple[str, ...] = ()
    description: str = ""


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, Template]:
    """name or alias -> Template, read once from templates/templates.yaml and the .jinja files."""
    import yaml

    meta = yaml.safe_load((TEMPLATES_DIR / "templates.yaml").read_text(encoding="utf-8"))
    out: dict[str, Template] = {}
    for name, m in meta.items():
        t = Template(
            name=name,
            source=(TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8"),
            stop_words=tuple(m.get("stop_words") or ()),
            model_types=tuple(m.get("model_types") or ()),
            uses_bos=bool(m.get("uses_bos", False)),
            aliases=tuple(m.get("aliases") or ()),
            description=m.get("description", ""),
        )
        for key in (name, *t.aliases):
            out[key] = t
    return out


def list_templates() -> list[str]:
    """Every accepted template name, aliases included, sorted."""
    return sorted(_registry())


def load_template(name: str) -> Template:
    try:
        return _registry()[name]
    except KeyError:
        raise ConfigError(
            f"unknown chat template '{name}'. Available: {', '.join(list_templates())}; "
            "or 'tokenizer' (the model's own), 'auto', 'none' (plain text)") from None


def default_template_for(model_type: str | None) -> str | None:
    """Our template for an HF config.model_type, e.g. 'gemma3_text' -> 'gemma'; None if unknown."""
    for name, t in _registry().items():
        if name == t.name and model_type in t.model_types:
            return name
    return None


def _own_template(tokenizer) -> str | None:
    """The tokenizer's own chat template; a dict of named templates gives its 'default' one."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default") or next(iter(own.values()), None)
    return own or None


def _is_source(text: str) -> bool:
    return "{{" in text or "{%" in text


def resolve_chat_template(choice: str | None, tokenizer,
                          model_type: str | None = None) -> str | None:
    """Turn the --chat-template choice into Jinja source, or None for plain text.

    "tokenizer": the tokenizer's own template; "none": no template; a name from
    list_templates(); a path to a .jinja file; Jinja source as is; None/"auto": the tokenizer's
    own, else the default for model_type, else chatml (with a warning).
    """
    if choice is not None and _is_source(choice):
        return choice
    key = (choice or "auto").strip()
    if key.lower() == "none":
        return None
    if key.lower() == "tokenizer":
        own = _own_template(tokenizer)
        if own is None:
            raise ConfigError(
                "--chat-template tokenizer: this tokenizer has no chat template of its own. "
                "Fix: pass --chat-template chatml (or another of: "
                f"{', '.join(list_templates())}), or --chat-template none to train on plain text")
        return own
    if key.lower() == "auto":
        own = _own_template(tokenizer)
        if own is not None:
            return own
        name = default_template_for(model_type)
        if name is None:
            log.warning("No chat template in the tokenizer and none known for model_type %r: "
                        "using chatml. Pass --chat-template to choose another.", model_type)
            name = "chatml"
        return load_template(name).source
    if key.endswith(".jinja") and Path(key).is_file():
        return Path(key).read_text(encoding="utf-8")
    return load_template(key).source


def _source(chat_template: str | None) -> str:
    """Name or source -> source; None (no template) renders as the 'empty' template."""
    if chat_template is None:
        return load_template("empty").source
    if _is_source(chat_template):
        return chat_template
    return load_template(chat_template).source


def attach_template(tokenizer, chat_template: str | None) -> None:
    """Store the template used in training on the tokenizer, so the saved tokenizer carries it."""
    if chat_template is not None:
        tokenizer.chat_template = _source(chat_template)


def _stop_words(source: str) -> list[str]:
    """Our template's stop words; for a foreign source, those of ours that appear in it."""
    for t in _registry().values():
        if t.source == source:
            return list(t.stop_words)
    known = {w for t in _registry().values() for w in t.stop_words}
    return sorted(w for w in known if w in source)


def stop_token_ids(tokenizer, chat_template: str | None) -> list[int]:
    """Token ids that end generation: the template's end-of-turn tokens and the eos."""
    ids: list[int] = []
    words = _stop_words(_source(chat_template)) if chat_template is not None else []
    for word in words:
        tok = tokenizer.encode(word, add_special_tokens=False)
        if len(tok) == 1 and tok[0] not in ids:  # a stop word split into pieces can't be an id
            ids.append(tok[0])
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids


# --- rendering + loss mask ------------------------------------------------------------------


def _render(tokenizer, messages, source, tools, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=source, tools=tools, tokenize=False,
            add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 TemplateError, raise_exception() inside the template
        raise ConfigError(f"the chat template could not render a conversation: {e}. "
                          "Fix: choose another --chat-template") from e


def _with_tools(messages: list[dict], tools, source: str) -> tuple[list[dict], list | None]:
    """Tools as a list for templates that render them; else folded into the system prompt."""
    if not tools:
        return messages, None
    if isinstance(tools, str):
        try:
            parsed = json.loads(tools)
        except ValueError:
            parsed = None
    else:
        parsed, tools = tools, json.dumps(tools, ensure_ascii=False)
    if parsed is not None and "tools" in source:
        return messages, parsed if isinstance(parsed, list) else [parsed]
    note = f"You can call these tools:\n{tools}"
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + note}
        return [first, *messages[1:]], None
    return [{"role": "system", "content": note}, *messages], None


def _split_by_prefixes(tokenizer, messages, source, tools) -> list[tuple[str, str]] | None:
    """[(prompt text, answer text)] per assistant message, from renders of growing prefixes.

    The prompt of turn k is what messages[:i] + generation prompt adds after turn k-1; the answer
    is what the assistant message itself adds. None when a template re-renders earlier text
    differently (e.g. it strips reasoning from older turns), so prefixes don't line up.
    """
    turns, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], source, tools, True)
        full = _render(tokenizer, messages[: i + 1], source, tools, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            return None
        turns.append((prompt[len(done):], full[len(prompt):]))
        done = full
    tail = _render(tokenizer, messages, source, tools, False)
    if not tail.startswith(done):
        return None
    return _add_tail(turns, tail[len(done):], trained=messages[-1]["role"] == "assistant")


def _add_tail(turns: list[tuple[str, str]], tail: str, trained: bool) -> list[tuple[str, str]]:
    """Text after the last answer: trained after a final assistant message (e.g. a template's
    own eos), else an untrained prompt-only turn."""
    if not tail:
        return turns
    if trained and turns:
        return [*turns[:-1], (turns[-1][0], turns[-1][1] + tail)]
    return [*turns, (tail, "")]


def _split_by_search(tokenizer, messages, source, tools) -> list[tuple[str, str]]:
    """Fallback: find each answer in the full rendering; train it plus the end markers after it."""
    text = _render(tokenizer, messages, source, tools, False)
    ends = {w for t in _registry().values() for w in t.stop_words}
    if tokenizer.eos_token:
        ends.add(tokenizer.eos_token)
    turns, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = m["content"].strip()
        start = text.find(content, pos)
        if start < 0:
            raise ConfigError("the chat template changes assistant messages, so the trained "
                              "tokens cannot be found. Fix: choose one of our templates with "
                              f"--chat-template ({', '.join(list_templates())})")
        end = start + len(content)
        grown = True
        while grown:  # swallow end-of-turn markers right after the answer
            grown = False
            for w in ends:
                if text.startswith(w, end):
                    end, grown = end + len(w), True
        turns.append((text[pos:start], text[start:end]))
        pos = end
    return _add_tail(turns, text[pos:], trained=messages[-1]["role"] == "assistant")


def _adds_bos(tokenizer) -> bool:
    """Does the tokenizer put a bos in front of plain text (the model's pretraining habit)?"""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def encode_turns(tokenizer, messages: list[dict], chat_template: str | None, *, tools=None,
                 add_eos_token: bool = True) -> list[tuple[list[int], list[int]]]:
    """[(prompt_ids, answer_ids)] per assistant message; concatenated they are the input ids.

    Each segment is tokenized on its own without special tokens, so a bos appears once: from the
    template when it writes one, else prepended when the tokenizer adds one to plain text. With
    add_eos_token the eos is appended to the last answer unless that answer already holds it.
    """
    source = _source(chat_template)
    messages, tools = _with_tools(list(messages), tools, source)
    texts = _split_by_prefixes(tokenizer, messages, source, tools)
    if texts is None:
        texts = _split_by_search(tokenizer, messages, source, tools)
    if not texts:  # no messages at all
        texts = [("", "")]

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    turns = [(ids(p), ids(a)) for p, a in texts]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first = turns[0][0] or turns[0][1]
    if _adds_bos(tokenizer) and first[:1] != [bos]:
        turns[0] = ([bos, *turns[0][0]], turns[0][1])
    if add_eos_token and eos is not None and texts[-1][1] and eos not in turns[-1][1]:
        turns[-1] = (turns[-1][0], [*turns[-1][1], eos])
    return turns


def turns_to_labels(turns, *, train_on_prompt: bool = False,
                    mask_history: bool = False) -> tuple[list[int], list[int]]:
    """Flatten turns to (input_ids, labels): answers are trained, prompts are IGNORE_INDEX.

    train_on_prompt trains prompts too; mask_history leaves only the last turn trainable.
    """
    last = max((k for k, (_, answer) in enumerate(turns) if answer), default=-1)
    input_ids, labels = [], []
    for k, (prompt, answer) in enumerate(turns):
        live = not mask_history or k == last
        input_ids += prompt + answer
        labels += prompt if (live and train_on_prompt) else [IGNORE_INDEX] * len(prompt)
        labels += answer if live else [IGNORE_INDEX] * len(answer)
    return input_ids, labels


def encode_conversation(tokenizer, messages: list[dict], chat_template: str | None, *, tools=None,
                        train_on_prompt: bool = False, mask_history: bool = False,
                        add_eos_token: bool = True) -> tuple[list[int], list[int]]:
    """Render a conversation with chat_template (name, source or None) -> (input_ids, labels).

    Labels are IGNORE_INDEX (-100) except the assistant answers with their end-of-turn marker
    (and the eos), unless train_on_prompt / mask_history say otherwise.
    """
    turns = encode_turns(tokenizer, messages, chat_template, tools=tools,
                         add_eos_token=add_eos_token)
    return turns_to_labels(turns, train_on_prompt=train_on_prompt, mask_history=mask_history)
