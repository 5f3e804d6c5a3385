"""Raw rows (dicts) -> canonical records, validating every field on the way.

Canonical records, the only shapes the rest of the engine sees:

    sft (conversation)  {"messages": [{"role", "content"}, ...], "tools": str | None}
    sft / pt (text)     {"text": str}
    preference          {"prompt": [..., user], "chosen": [assistant], "rejected": [assistant]}
    kto                 {"prompt": [..., user], "completion": [assistant], "label": bool}

A row is described by a `formatting` (alpaca, sharegpt, openai) and a column map with
LLaMA-Factory's keys (prompt, query, response, history, messages, system, tools, chosen,
rejected, kto_tag, text). Anything malformed raises DataError naming the file, the 1-based
record number and the field, so the user can open the file and fix that line.
"""
from __future__ import annotations

import json

from core.errors import DataError

KINDS = ("sft", "text", "preference", "kto")
FORMATTINGS = ("alpaca", "sharegpt", "openai")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools",
               "chosen", "rejected", "kto_tag", "text")

# Default column names per formatting, as in LLaMA-Factory's dataset_info.json.
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output",
               "system": "system", "history": "history", "tools": "tools",
               "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools",
                 "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools",
               "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"},
}
DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "system_tag": "system",
                 "observation_tag": "observation", "function_tag": "function_call"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "system_tag": "system",
               "observation_tag": "tool", "function_tag": "function_call"},
}

COLUMN_FIX = ("name the column with --text-column / --prompt-text-column / --rejected-text-column "
              "or column_mapping (or `columns` in dataset_info.json), or pass --auto-convert-dataset")


class _At:
    """Where we are: file and record number, for error messages."""

    def __init__(self, file, record):
        self.file, self.record = str(file), record

    def error(self, message, field=None, expected=None, fix=None):
        return DataError(self.file, message, record=self.record, field=field, expected=expected, fix=fix)


# --------------------------------------------------------------------------- small checks

def _present(value) -> bool:
    return value is not None and value != "" and value != []


def _required(row, col, at, expected="a string"):
    if col not in row or not _present(row[col]):
        if col in row:
            raise at.error(f"column '{col}' is empty", field=col, expected=expected,
                           fix="fill it in or remove the record")
        raise at.error(f"column '{col}' is missing; columns here: {sorted(row)}", field=col,
                       expected=expected, fix=COLUMN_FIX)
    return row[col]


def _string(value, at, field, what="content"):
    if not isinstance(value, str):
        raise at.error(f"{what} must be a string, got {type(value).__name__}", field=field,
                       expected="a string")
    if not value.strip():
        raise at.error(f"{what} is empty", field=field, expected="non-empty text")
    return value


def _tools(row, cols, at):
    col = cols.get("tools")
    value = row.get(col) if col else None
    if not _present(value):
        return None
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return _string(value, at, col, "tools")


def _system(row, cols, at):
    col = cols.get("system")
    value = row.get(col) if col else None
    return _string(value, at, col, "system prompt") if _present(value) else None


def _label(value, at, field):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise at.error(f"label {value!r} is not a boolean", field=field, expected="true or false")


# --------------------------------------------------------------------------- messages

def _role_names(tags, strict):
    """Raw role value -> canonical role. openai is strict: only system/user/assistant."""
    names = {"system": "system", "user": "user", "assistant": "assistant"}
    if not strict:
        names.update({"human": "user", "gpt": "assistant"})
        if tags:
            for key, role in (("user_tag", "user"), ("assistant_tag", "assistant"),
                              ("system_tag", "system")):
                if tags.get(key):
                    names[tags[key]] = role
    return names


def _message(m, at, field, tags, strict):
    """One message dict -> (role, content, name of the role key for errors)."""
    if not isinstance(m, dict):
        raise at.error(f"message is a {type(m).__name__}", field=field,
                       expected='an object like {"role": "user", "content": "..."}')
    if tags and tags.get("role_tag") in m:
        rkey, ckey = tags["role_tag"], tags.get("content_tag", "content")
    elif "role" in m:
        rkey, ckey = "role", "content"
    elif "from" in m and not strict:
        rkey, ckey = "from", "value"
    else:
        raise at.error(f"message has no role; keys here: {sorted(m)}", field=f"{field}.role",
                       expected="'role' and 'content' keys")
    names = _role_names(tags, strict)
    role = names.get(m[rkey]) if isinstance(m[rkey], str) else None
    if role is None:
        raise at.error(f"unknown role {m[rkey]!r}", field=f"{field}.{rkey}",
                       expected="one of " + ", ".join(sorted(names)))
    if ckey not in m:
        raise at.error("message has no content", field=f"{field}.{ckey}", expected="a string")
    content = _string(m[ckey], at, f"{field}.{ckey}")
    return role, content, rkey


def parse_messages(value, at, field, *, tags=None, strict=False, end="assistant",
                   system=None) -> list[dict]:
    """Validate a conversation and return canonical messages.

    Rules (seed 003's OpenAI format): roles system/user/assistant only; system only first;
    then user and assistant alternate, starting with user; `end` says who speaks last:
    "assistant" for a full conversation (at least one pair), "user" for a prompt.
    `system` (from a separate column) is put first when the messages carry none.
    """
    if not isinstance(value, list) or not value:
        raise at.error("conversation must be a non-empty list of messages", field=field,
                       expected='[{"role": "user", "content": "..."}, ...]')
    parsed = [_message(m, at, f"{field}[{i}]", tags, strict) for i, m in enumerate(value)]
    start = 0
    if parsed[0][0] == "system":
        start = 1
        if system is not None:
            raise at.error("system prompt given both in the system column and as the first message",
                           field=field, fix="keep only one")
    for i, (role, _, rkey) in enumerate(parsed[start:], start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if role == "system":
            raise at.error("a system message may only come first", field=f"{field}[{i}].{rkey}",
                           expected="system first, then user/assistant turns")
        if role != want:
            raise at.error(f"role '{role}' out of order: turns must alternate user, assistant, "
                           "starting with user", field=f"{field}[{i}].{rkey}", expected=want)
    turns = len(parsed) - start
    last = len(parsed) - 1
    if end == "assistant" and (turns < 2 or turns % 2):
        raise at.error("conversation must end with an assistant reply: user/assistant turns come "
                       f"in pairs, at least one (found {turns} turn(s))",
                       field=f"{field}[{last}]", expected="user/assistant pairs")
    if end == "user" and turns % 2 == 0:
        raise at.error("a prompt must end with a user turn", field=f"{field}[{last}]",
                       expected="an odd number of user/assistant turns ending with user")
    out = [{"role": role, "content": content} for role, content, _ in parsed]
    if system is not None:
        out.insert(0, {"role": "system", "content": system})
    return out


def _answer(value, at, field, tags=None):
    """chosen / rejected / completion: a string, one assistant message, or a list of one."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(value, at, field)}]
    if isinstance(value, dict):  # LLaMA-Factory's sharegpt ranking: {"from": "gpt", "value": ...}
        value = [value]
    if isinstance(value, list) and len(value) == 1:
        role, content, rkey = _message(value[0], at, field, tags, strict=False)
        if role != "assistant":
            raise at.error(f"answer has role '{role}'", field=f"{field}.{rkey}", expected="assistant")
        return [{"role": "assistant", "content": content}]
    raise at.error("answer must be a string or a single assistant message", field=field,
                   expected='"text" or [{"role": "assistant", "content": "..."}]')


def _alpaca_prompt(row, cols, at):
    """instruction (+ input) with optional system and history -> messages ending with user.

    The prompt column may also hold a message list already (TRL's conversational prompt).
    """
    system = _system(row, cols, at)
    value = _required(row, cols["prompt"], at)
    if isinstance(value, list):
        return parse_messages(value, at, cols["prompt"], end="user", system=system)
    text = _string(value, at, cols["prompt"], "instruction")
    query = row.get(cols.get("query")) if cols.get("query") else None
    if _present(query):
        text = text + "\n" + _string(query, at, cols["query"], "input")
    msgs = [{"role": "system", "content": system}] if system else []
    hcol = cols.get("history")
    history = row.get(hcol) if hcol else None
    if _present(history):
        if not isinstance(history, list):
            raise at.error("history must be a list of [question, answer] pairs", field=hcol,
                           expected='[["q1", "a1"], ["q2", "a2"]]')
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise at.error("history entry is not a [question, answer] pair",
                               field=f"{hcol}[{i}]", expected='["question", "answer"]')
            msgs.append({"role": "user", "content": _string(pair[0], at, f"{hcol}[{i}][0]")})
            msgs.append({"role": "assistant", "content": _string(pair[1], at, f"{hcol}[{i}][1]")})
    msgs.append({"role": "user", "content": text})
    return msgs


# --------------------------------------------------------------------------- converters

def resolve_columns(formatting: str, columns: dict | None) -> dict:
    """Default columns for the formatting, overridden by the explicit (non-empty) ones."""
    cols = dict(DEFAULT_COLUMNS[formatting])
    cols.update({k: v for k, v in (columns or {}).items() if v})
    return cols


def resolve_tags(formatting: str, tags: dict | None) -> dict | None:
    if formatting == "alpaca":
        return None
    out = dict(DEFAULT_TAGS[formatting])
    out.update({k: v for k, v in (tags or {}).items() if v})
    return out


def convert_row(row, *, kind="sft", formatting="alpaca", columns=None, tags=None,
                file="<data>", record=None) -> dict:
    """One raw row -> one canonical record of `kind` (see the module docstring)."""
    at = _At(file, record)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if formatting not in FORMATTINGS:
        raise at.error(f"unknown formatting {formatting!r}", expected=" | ".join(FORMATTINGS))
    if not isinstance(row, dict):
        raise at.error(f"record is a {type(row).__name__}", expected="an object {...}")
    cols = resolve_columns(formatting, columns)
    tags = resolve_tags(formatting, tags)
    strict = formatting == "openai"

    if kind == "text":
        col = cols.get("text") or cols.get("prompt")
        if not col:
            raise at.error(f"{formatting} data has no text column", field="text",
                           expected="columns: {\"text\": \"<column>\"}", fix=COLUMN_FIX)
        return {"text": _string(_required(row, col, at), at, col, "text")}

    if kind == "sft" and cols.get("text"):  # a text column: plain text or a whole conversation
        col = cols["text"]
        value = _required(row, col, at, expected="a string or a list of messages")
        if isinstance(value, list):
            return {"messages": parse_messages(value, at, col, tags=tags, system=_system(row, cols, at)),
                    "tools": _tools(row, cols, at)}
        return {"text": _string(value, at, col, "text")}

    if formatting == "alpaca":
        prompt = _alpaca_prompt(row, cols, at)
        if kind == "sft":
            answer = _string(_required(row, cols["response"], at), at, cols["response"], "output")
            return {"messages": prompt + [{"role": "assistant", "content": answer}],
                    "tools": _tools(row, cols, at)}
        if kind == "preference":
            return {"prompt": prompt,
                    "chosen": _answer(_required(row, cols["chosen"], at), at, cols["chosen"]),
                    "rejected": _answer(_required(row, cols["rejected"], at), at, cols["rejected"])}
        return {"prompt": prompt,
                "completion": _answer(_required(row, cols["response"], at), at, cols["response"]),
                "label": _label(_required(row, cols["kto_tag"], at, "true or false"), at, cols["kto_tag"])}

    # sharegpt / openai: a message list column
    mcol = cols["messages"]
    value = _required(row, mcol, at, expected="a list of messages")
    system = _system(row, cols, at)
    if kind == "sft":
        return {"messages": parse_messages(value, at, mcol, tags=tags, strict=strict, system=system),
                "tools": _tools(row, cols, at)}
    if kind == "preference":
        return {"prompt": parse_messages(value, at, mcol, tags=tags, strict=strict, end="user",
                                         system=system),
                "chosen": _answer(_required(row, cols["chosen"], at), at, cols["chosen"], tags),
                "rejected": _answer(_required(row, cols["rejected"], at), at, cols["rejected"], tags)}
    msgs = parse_messages(value, at, mcol, tags=tags, strict=strict, system=system)
    return {"prompt": msgs[:-1], "completion": msgs[-1:],
            "label": _label(_required(row, cols["kto_tag"], at, "true or false"), at, cols["kto_tag"])}


def convert_rows(rows, **spec) -> list[dict]:
    """[(record_number, row), ...] -> canonical records; spec as for convert_row."""
    return [convert_row(row, record=n, **spec) for n, row in rows]


# --------------------------------------------------------------------------- auto-convert

DETECTED = ("preference", "kto", "openai", "sharegpt", "alpaca", "text")


def detect_format(row, file="<data>", record=None) -> str:
    """Guess a row's format for --auto-convert-dataset.

    preference: prompt + chosen + rejected; kto: prompt + completion + label;
    openai: messages; sharegpt: conversations; alpaca: instruction + output; text: text.
    """
    at = _At(file, record)
    if not isinstance(row, dict):
        raise at.error(f"record is a {type(row).__name__}", expected="an object {...}")
    keys = set(row)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if "messages" in keys:
        first = row["messages"][0] if isinstance(row["messages"], list) and row["messages"] else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "openai"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise at.error(f"cannot tell the format from the columns {sorted(keys)}",
                   expected="messages, conversations, instruction+output, prompt+chosen+rejected, "
                            "prompt+completion+label, or text",
                   fix="rename the columns, or map them with column_mapping / --text-column")


def spec_for_detected(fmt: str, row: dict) -> dict:
    """A detected format -> {formatting, columns} for convert_row."""
    extra = {k: k for k in ("chosen", "rejected", "kto_tag", "system", "tools") if k in row}
    if "label" in row and "kto_tag" not in row:
        extra["kto_tag"] = "label"
    if fmt == "preference":
        return {"formatting": "alpaca", "columns": {**extra, "prompt": "prompt"}}
    if fmt == "kto":
        return {"formatting": "alpaca", "columns": {**extra, "prompt": "prompt", "response": "completion"}}
    if fmt in ("openai", "sharegpt"):
        mcol = "messages" if "messages" in row else "conversations"
        return {"formatting": fmt, "columns": {**extra, "messages": mcol}}
    if fmt == "text":
        return {"formatting": "alpaca", "columns": {"text": "text"}}
    return {"formatting": "alpaca", "columns": extra}
