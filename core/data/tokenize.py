"""Canonical records -> input_ids, attention_mask, labels (-100 where the loss is off).

Conversations go through core.templates (render + assistant mask); plain text is trained whole.
Truncation to cutoff_len keeps the answer: the oldest turns go first, then the prompt is cut
from the left (its bos kept), and only an answer longer than cutoff_len loses its end.

A record with nothing left to train (every label -100, e.g. an empty answer) is untrainable:
encode_sft_record / encode_text_record return None for it and tokenize_dataset drops it with a
warning that counts them.
"""
from __future__ import annotations

import logging

from core.errors import DataError
from core.templates import IGNORE_INDEX, encode_turns, turns_to_labels

log = logging.getLogger(__name__)


def _example(input_ids: list[int], labels: list[int]) -> dict | None:
    # labels[0] is never a target (a causal LM predicts token t from tokens < t), so a record
    # whose only trained token is the first one trains nothing either.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _later_starts(messages: list[dict]) -> list[list[dict]]:
    """The conversation without its 1, 2, ... oldest user/assistant exchanges (system kept)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system):]
    starts = [i for i, m in enumerate(body) if m["role"] == "user" and i > 0]
    return [system + body[i:] for i in starts
            if any(m["role"] == "assistant" for m in body[i:])]


def _cut_left(prompt: list[int], budget: int, bos: int | None) -> list[int]:
    """The last `budget` prompt tokens, keeping a leading bos."""
    if budget <= 0:
        return []
    if bos is not None and prompt[:1] == [bos] and len(prompt) > budget:
        return [bos] + prompt[len(prompt) - budget + 1:] if budget > 1 else [bos]
    return prompt[max(0, len(prompt) - budget):]


def encode_sft_record(tokenizer, record: dict, chat_template: str | None, *, cutoff_len: int,
                      train_on_prompt: bool = False, mask_history: bool = False,
                      add_eos_token: bool = True) -> dict | None:
    """One canonical conversation -> {input_ids, attention_mask, labels}, or None if untrainable.

    chat_template: one of our names, Jinja source, or None (contents concatenated).
    """
    messages, tools = record["messages"], record.get("tools")
    opts = dict(tools=tools, add_eos_token=add_eos_token)
    turns = encode_turns(tokenizer, messages, chat_template, **opts)
    for shorter in _later_starts(messages):  # drop history, oldest first, until it fits
        if sum(len(p) + len(a) for p, a in turns) <= cutoff_len:
            break
        turns = encode_turns(tokenizer, shorter, chat_template, **opts)
    if sum(len(p) + len(a) for p, a in turns) > cutoff_len:
        # one exchange left: everything before the last answer is prompt
        *history, (prompt, answer) = turns
        for p, a in history:
            prompt = p + a + prompt
        bos = tokenizer.bos_token_id
        keep_bos = 1 if bos is not None and prompt[:1] == [bos] else 0
        if len(answer) > cutoff_len - keep_bos:  # the answer alone is too long: cut its end
            prompt, answer = prompt[:keep_bos], answer[: cutoff_len - keep_bos]
        else:
            prompt = _cut_left(prompt, cutoff_len - len(answer), bos)
        turns = [(prompt, answer)]  # earlier answers, if any, are now part of the prompt
        mask_history = True
    input_ids, labels = turns_to_labels(turns, train_on_prompt=train_on_prompt,
                                        mask_history=mask_history)
    return _example(input_ids, labels)


def encode_text_record(tokenizer, text: str, *, cutoff_len: int,
                       add_eos_token: bool = True) -> dict | None:
    """Plain text, every token trained; bos as the tokenizer adds it, eos appended if asked.

    Text longer than cutoff_len keeps its beginning (and so loses the eos: it did not end).
    """
    if not text.strip():
        return None
    input_ids = tokenizer(text)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and input_ids[-1:] != [eos]:
        input_ids = input_ids + [eos]
    input_ids = input_ids[:cutoff_len]
    return _example(input_ids, list(input_ids))


def tokenize_dataset(tokenizer, records, chat_template: str | None, *, cutoff_len: int = 2048,
                     train_on_prompt: bool = False, mask_history: bool = False,
                     add_eos_token: bool = True, text_field: str = "text",
                     source: str = "dataset"):
    """Canonical records (iterable of dicts or a datasets.Dataset) -> datasets.Dataset with
    input_ids, attention_mask, labels. Records with "messages" use chat_template; records with
    text_field are plain text. Untrainable records are dropped with one warning counting them;
    DataError (naming `source`) if none is left.
    """
    from datasets import Dataset

    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    total = dropped = 0
    for record in records:
        total += 1
        if record.get("messages"):
            ex = encode_sft_record(tokenizer, record, chat_template, cutoff_len=cutoff_len,
                                   train_on_prompt=train_on_prompt, mask_history=mask_history,
                                   add_eos_token=add_eos_token)
        else:
            ex = encode_text_record(tokenizer, record.get(text_field) or "",
                                    cutoff_len=cutoff_len, add_eos_token=add_eos_token)
        if ex is None:
            dropped += 1
            continue
        for key in rows:
            rows[key].append(ex[key])
    if dropped:
        log.warning("%s: skipped %d of %d records with no trainable tokens (empty answer, "
                    "or cutoff_len=%d too short)", source, dropped, total, cutoff_len)
    if not rows["input_ids"]:
        raise DataError(source, f"none of the {total} records has trainable tokens",
                        fix="check that answers are not empty, or raise --block-size/cutoff_len")
    return Dataset.from_dict(rows)


def pack_dataset(dataset, *, cutoff_len: int, pad_token_id: int | None = None, source: str = "dataset"):
    """Concatenate tokenized examples (input_ids, labels) into blocks of exactly cutoff_len tokens.

    Examples are joined end to end in their order, so a block may hold the end of one example and
    the start of the next (separated by whatever the examples end with, e.g. eos): no token is
    spent on padding between documents. The tokens after the last full block form one more block
    padded to cutoff_len with pad_token_id (attention 0, labels -100), so nothing is lost; without
    a pad_token_id they are dropped. Existing labels (-100 for masked prompts) travel with their
    tokens; examples without labels train every token.
    """
    import itertools

    import numpy as np
    from datasets import Dataset

    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    if isinstance(dataset, Dataset):
        columns = dataset.column_names
        ids = list(dataset["input_ids"])
        labels = list(dataset["labels"]) if "labels" in columns else ids
    else:  # a list of dicts
        ids = [ex["input_ids"] for ex in dataset]
        labels = [ex.get("labels", ex["input_ids"]) for ex in dataset]
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
    flat_labels = np.fromiter(itertools.chain.from_iterable(labels), dtype=np.int64)
    if flat_ids.shape != flat_labels.shape:
        raise ValueError("input_ids and labels differ in length; cannot pack")
    if flat_ids.size == 0:
        raise DataError(source, "nothing to pack: no tokens", fix="check that the records hold text")
    n_full, rest = divmod(flat_ids.size, cutoff_len)
    used = n_full * cutoff_len
    block_ids = flat_ids[:used].reshape(n_full, cutoff_len)
    block_labels = flat_labels[:used].reshape(n_full, cutoff_len)
    block_mask = np.ones_like(block_ids)
    if rest and pad_token_id is not None:
        pad = cutoff_len - rest
        block_ids = np.concatenate([block_ids, np.concatenate(
            [flat_ids[used:], np.full(pad, pad_token_id, dtype=np.int64)])[None]])
        block_labels = np.concatenate([block_labels, np.concatenate(
            [flat_labels[used:], np.full(pad, IGNORE_INDEX, dtype=np.int64)])[None]])
        block_mask = np.concatenate([block_mask, np.concatenate(
            [np.ones(rest, dtype=np.int64), np.zeros(pad, dtype=np.int64)])[None]])
    elif rest:
        log.info("%s: packing dropped the last %d tokens (less than one %d-token block)", source, rest,
                 cutoff_len)
    if len(block_ids) == 0:
        raise DataError(source, f"{flat_ids.size} tokens are less than one block of {cutoff_len}",
                        fix="lower --block-size or add data")
    log.info("%s: packed %d examples (%d tokens) into %d blocks of %d tokens", source, len(ids),
             flat_ids.size, len(block_ids), cutoff_len)
    return Dataset.from_dict({"input_ids": block_ids.tolist(), "attention_mask": block_mask.tolist(),
                              "labels": block_labels.tolist()})


def neat_pack_dataset(dataset, *, cutoff_len: int, source: str = "dataset"):
    """Pack whole examples into rows of at most cutoff_len tokens without letting them see each
    other: position_ids restart at 0 for every example, which transformers turns into a
    block-diagonal causal mask (sdpa/eager) or variable-length attention (flash-attention 2) when
    no attention_mask is given. The first label of each example is -100 (nothing before it in its
    own sequence predicts it), so a row's loss equals that of its examples run one by one.

    Examples are placed first-fit by decreasing length (an example longer than cutoff_len was
    already truncated by tokenize_dataset); none is split across rows.
    """
    from datasets import Dataset

    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    ids = list(dataset["input_ids"])
    labels = list(dataset["labels"]) if "labels" in dataset.column_names else ids
    if not ids:
        raise DataError(source, "nothing to pack: no examples", fix="check that the records hold text")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i in order:
        n = min(len(ids[i]), cutoff_len)
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([]), room.append(cutoff_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        row_ids, row_labels, row_pos = [], [], []
        for i in row:
            x, y = ids[i][:cutoff_len], labels[i][:cutoff_len]
            row_ids += x
            row_labels += [IGNORE_INDEX] + list(y[1:])
            row_pos += list(range(len(x)))
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["position_ids"].append(row_pos)
    log.info("%s: neat-packed %d examples into %d rows of at most %d tokens (%.0f%% filled)", source, len(ids),
             len(rows), cutoff_len, 100 * sum(map(len, out["input_ids"])) / (len(rows) * cutoff_len))
    return Dataset.from_dict(out)


class NeatPackCollator:
    """Batches of neat-packed rows: right-padded, no attention_mask (the position ids carry the
    example boundaries; the padding forms its own trailing sequence, which causal attention keeps
    away from the real tokens), labels -100 on padding, and no KV cache so transformers builds the
    packed-sequence mask."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            n = len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad] * (width - n))
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * (width - n))
            batch["position_ids"].append(list(f["position_ids"]) + list(range(width - n)))
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        out["use_cache"] = False
        return out
