"""Evaluation: metrics on generated answers, batch generation, and the post-training check.

    perplexity  exp(mean cross-entropy over the answer tokens), from the eval loss
    bleu        corpus BLEU (sacrebleu, 0-100) of the generated answers against the references
    rouge       ROUGE-1/2/L F1 (rouge-score, with stemming; reported 0-100 like BLEU)
    accuracy    exact match after trimming, case folding and collapsing whitespace (0-1)

Used three ways: `--use-enhanced-eval` during training (EnhancedEvalCallback, at every
evaluation and at the end), `aitraining eval` (run_eval: a model + adapter over a dataset),
and the post-training check after SFT (post_train_check: does generation stop? did the saved
tokenizer keep the chat template the run trained with?).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from core.config_io import atomic_write
from core.errors import ConfigError

log = logging.getLogger("aitraining")

METRICS = ("perplexity", "bleu", "rouge", "accuracy")
GENERATIVE = ("bleu", "rouge", "accuracy")  # the metrics that need generated answers
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.jsonl"
SAMPLES_FILE = "samples.jsonl"


def parse_metrics(text: str | Iterable[str]) -> list[str]:
    """'perplexity,bleu' -> ['perplexity', 'bleu']; an unknown name is a ConfigError."""
    names = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise ConfigError(f"--eval-metrics: unknown metric(s) {', '.join(bad)}; choose from "
                          f"{','.join(METRICS)}")
    return list(dict.fromkeys(names))


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).casefold()


def text_metrics(predictions: list[str], references: list[str], names: Iterable[str]) -> dict[str, float]:
    """The generative metrics of `names` for aligned predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out: dict[str, float] = {}
    if not predictions:
        return out
    names = set(names)
    if "bleu" in names:
        import sacrebleu

        out["bleu"] = round(sacrebleu.corpus_bleu(predictions, [references]).score, 4)
    if "rouge" in names:
        from rouge_score import rouge_scorer

        kinds = ("rouge1", "rouge2", "rougeL")
        scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
        scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        for k in kinds:
            out[k] = round(100.0 * sum(s[k].fmeasure for s in scores) / len(scores), 4)
    if "accuracy" in names:
        hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
        out["accuracy"] = round(hits / len(predictions), 4)
    return out


def perplexity(mean_loss: Optional[float]) -> Optional[float]:
    if mean_loss is None or not math.isfinite(mean_loss):
        return None
    return round(math.exp(min(mean_loss, 50.0)), 4)  # exp(50) is already meaningless; avoid inf


# --------------------------------------------------------------------------- generation

def cases(records: list[dict], limit: Optional[int] = None) -> list[dict]:
    """Canonical conversations -> [{messages (the prompt), tools, reference}]: the prompt is every
    message before the last answer. Records that do not end with an answer are skipped."""
    out = []
    for r in records:
        msgs = r.get("messages") or []
        if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            continue
        out.append({"messages": msgs[:-1], "tools": r.get("tools"), "reference": msgs[-1]["content"]})
        if limit and len(out) >= limit:
            break
    return out


def generate(model, tokenizer, prompts: list[list[dict]], chat_template: Optional[str], *,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             batch_size: int = 8, seed: int = 42) -> list[dict]:
    """Answers for each prompt, rendered as training renders it, in left-padded batches.

    Returns [{prediction, stopped, new_tokens}]: `stopped` is False when the answer ran into
    max_new_tokens without an end-of-turn / eos token.
    """
    import torch

    from core.chat import prompt_ids
    from core.templates import _source, stop_token_ids

    source = _source(chat_template) if chat_template is not None else None
    stops = stop_token_ids(tokenizer, chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True  # training turns the KV cache off; generation wants it
    torch.manual_seed(seed)
    results = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [prompt_ids(tokenizer, m, source) for m in prompts[start:start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            sample = temperature > 0
            kw = dict(do_sample=sample, max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                      pad_token_id=pad)
            if sample:
                kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
            else:  # greedy: make sure a model's own sampling defaults do not leak in
                kw.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, **kw)
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), None)
                answer = row if cut is None else row[:cut]
                results.append({"prediction": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                                "stopped": cut is not None, "new_tokens": len(answer)})
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        if was_training:
            model.train()
    return results


def predict_and_score(model, tokenizer, records: list[dict], chat_template: Optional[str], names, *,
                      limit: Optional[int] = None, **gen) -> tuple[dict[str, float], list[dict]]:
    """Generate on the records' prompts, score against their answers -> (metrics, prediction rows)."""
    todo = cases(records, limit)
    outs = generate(model, tokenizer, [c["messages"] for c in todo], chat_template, **gen) if todo else []
    rows = [{"prompt": c["messages"][-1]["content"], "reference": c["reference"], **o} for c, o in zip(todo, outs)]
    metrics = text_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows], names)
    if rows:
        metrics["stopped_fraction"] = round(sum(r["stopped"] for r in rows) / len(rows), 4)
    return metrics, rows


def answer_loss(model, tokenizer, records: list[dict], chat_template: Optional[str], *,
                cutoff_len: int = 1024, batch_size: int = 8) -> Optional[float]:
    """Mean cross-entropy over the answer tokens (the trained tokens), as training computes it."""
    import torch

    from core.data.tokenize import encode_sft_record
    from core.templates import IGNORE_INDEX

    examples = [e for e in (encode_sft_record(tokenizer, r, chat_template, cutoff_len=cutoff_len)
                            for r in records if r.get("messages")) if e is not None]
    if not examples:
        return None
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in batch], device=device)
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch],
                                device=device)
            labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in batch],
                                  device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
            total += loss.item()
            count += int((target != IGNORE_INDEX).sum())
    return total / count if count else None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def merge_results(run_dir: Path, entry: dict) -> dict:
    """Append an evaluation to eval_results.json: {"latest": {...}, "history": [...]}."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {"history": []}
    doc["latest"] = entry
    doc.setdefault("history", []).append(entry)
    atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False))
    return doc


# --------------------------------------------------------------------------- during training

def _append_log(run_dir: Path, record: dict) -> None:
    from core.events import LOG_FILE

    with open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def make_enhanced_eval_callback(params, run_dir: Path, tokenizer, chat_template: Optional[str]):
    """The --use-enhanced-eval callback for a conversation stage (None when there is nothing to do)."""
    from transformers import TrainerCallback

    names = parse_metrics(params.eval_metrics)
    _, eval_records = _records(params)
    if not eval_records:
        log.warning("--use-enhanced-eval: no validation conversations to generate on (--valid-split / "
                    "--val-size); skipped")
        return None
    run_dir = Path(run_dir)

    class EnhancedEvalCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
            if not state.is_world_process_zero or model is None or metrics is None:
                return
            started = time.time()
            extra: dict[str, Any] = {}
            if "perplexity" in names and metrics.get("eval_loss") is not None:
                extra["perplexity"] = perplexity(metrics["eval_loss"])
            rows: list[dict] = []
            if any(n in GENERATIVE for n in names) or params.eval_save_predictions:
                scores, rows = predict_and_score(model, tokenizer, eval_records, chat_template, names,
                                                 max_new_tokens=params.eval_max_new_tokens,
                                                 batch_size=params.eval_batch_size, seed=params.seed)
                extra.update(scores)
            extra = {f"eval_{k}": v for k, v in extra.items() if v is not None}
            metrics.update(extra)  # the trainer's evaluate() returns this dict: final metrics include them
            record = {"step": state.global_step, "total_steps": state.max_steps,
                      "epoch": round(state.epoch or 0.0, 4), **extra,
                      "eval_seconds": round(time.time() - started, 2)}
            _append_log(run_dir, record)
            merge_results(run_dir, {**record, "eval_loss": metrics.get("eval_loss"),
                                    "n_examples": len(eval_records)})
            if params.eval_save_predictions and rows:
                write_jsonl(run_dir / PREDICTIONS_FILE, [{"step": state.global_step, **r} for r in rows])
            log.info("enhanced eval at step %d: %s", state.global_step,
                     ", ".join(f"{k}={v}" for k, v in extra.items()))

    return EnhancedEvalCallback()


def _records(params):
    from core.stages.common import load_records

    return load_records(params, kind="sft")


# --------------------------------------------------------------------------- after SFT

def post_train_check(params, run_dir: Path, model, tokenizer, chat_template: Optional[str], *,
                     n: int = 4) -> dict:
    """Generate on a few validation (else training) prompts with the trained model and check
    that answers end (an end-of-turn / eos within the token budget) and that the saved tokenizer
    carries the chat template training used. Writes samples.jsonl; returns the findings
    (also put into status.json by the caller) and logs a WARNING for each problem."""
    from core.templates import _source

    run_dir = Path(run_dir)
    train_records, eval_records = _records(params)
    todo = cases(eval_records or [], n) or cases(train_records, n)
    budget = params.eval_max_new_tokens
    rows = generate(model, tokenizer, [c["messages"] for c in todo], chat_template, max_new_tokens=budget,
                    batch_size=n, seed=params.seed) if todo else []
    samples = [{"prompt": c["messages"][-1]["content"], "reference": c["reference"], **o}
               for c, o in zip(todo, rows)]
    write_jsonl(run_dir / SAMPLES_FILE, samples)
    warnings = []
    runaway = [s for s in samples if not s["stopped"]]
    if runaway:
        warnings.append(f"{len(runaway)} of {len(samples)} sample answers did not stop within {budget} new "
                        "tokens (no end-of-turn or eos token): the model may not have learned where an "
                        "answer ends. Check --add-eos-token, the chat template, and train longer; "
                        f"see {run_dir / SAMPLES_FILE}")
    saved = _saved_template(run_dir)
    trained = _source(chat_template) if chat_template is not None else None
    if trained is not None and (saved or "").strip() != trained.strip():
        warnings.append("the saved tokenizer's chat template differs from the one used in training: chat "
                        "and export would format prompts differently than the model learned. Fix: pass "
                        "--chat-template to chat, or re-save the tokenizer with the run's template")
    for w in warnings:
        log.warning("post-training check: %s", w)
    if not warnings:
        log.info("post-training check: %d samples stopped properly; template saved with the model "
                 "(%s)", len(samples), run_dir / SAMPLES_FILE)
    return {"samples": len(samples), "warnings": warnings}


def _saved_template(run_dir: Path) -> Optional[str]:
    """The chat template in the run's saved tokenizer (tokenizer_config.json or chat_template.jinja)."""
    jinja = run_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        cfg = json.loads((run_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = cfg.get("chat_template")
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- `aitraining eval`

def run_eval(*, model: Optional[str], adapter: Optional[str], data_path: str, output: Path,
             metrics: str = "perplexity,bleu,rouge,accuracy", chat_template: Optional[str] = None,
             split: str = "train", max_samples: Optional[int] = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 8,
             seed: int = 42, dataset_dir: Optional[str] = None, cutoff_len: int = 1024,
             trust_remote_code: bool = False) -> dict:
    """Batch generation over a dataset with a model (and adapter): metrics to
    <output>/eval_results.json, every prediction beside its reference to <output>/predictions.jsonl."""
    from core import DATA_DIR
    from core.chat import _load
    from core.data.loader import load_data

    if not (model or adapter):
        raise ConfigError("aitraining eval needs --model (and/or --adapter)")
    names = parse_metrics(metrics)
    records, _ = load_data(data_path, kind="sft", split=split, max_samples=max_samples,
                           data_dir=Path(dataset_dir) if dataset_dir else DATA_DIR, seed=seed)
    started = time.time()
    state = _load(dict(model=model, adapter=adapter, chat_template=chat_template, device=None, dtype=None,
                       trust_remote_code=trust_remote_code))
    mdl, tok, source = state["model"], state["tok"], state["source"]
    scores, rows = predict_and_score(mdl, tok, records, source, names, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k,
                                     batch_size=batch_size, seed=seed)
    if "perplexity" in names:
        scores["loss"] = answer_loss(mdl, tok, records, source, cutoff_len=cutoff_len, batch_size=batch_size)
        scores["perplexity"] = perplexity(scores["loss"])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_jsonl(output / PREDICTIONS_FILE, rows)
    result = {"model": state["info"]["model"], "adapter": state["info"]["adapter"], "data_path": data_path,
              "template": state["info"]["template"], "n_examples": len(rows), "max_new_tokens": max_new_tokens,
              "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "seconds": round(time.time() - started, 2), "metrics": scores}
    atomic_write(output / RESULTS_FILE, json.dumps(result, indent=2, ensure_ascii=False))
    return result
