"""Evaluation: metrics against hand-computed values, --use-enhanced-eval + --log tensorboard + the
post-training check in one real SFT run, and the `aitraining eval` subcommand in a subprocess."""
import json
import math
import os
import subprocess
import sys

import pytest

from core import LLMTrainingParams, Project
from core.errors import ConfigError
from core.evaluate import normalize, parse_metrics, perplexity, text_metrics
from core.events import read_log, read_status

from conftest import QA, REPO, build_tiny_model, write_alpaca

PREDS = ["a b c d e f", "x y z w"]
REFS = ["a b c d e g", "x y z w"]


def test_bleu_rouge_accuracy_match_hand_computed_values():
    m = text_metrics(PREDS, REFS, ["bleu", "rouge", "accuracy"])
    # corpus BLEU: clipped n-gram matches summed over both pairs, equal lengths (brevity penalty 1):
    # 1-grams 9/10, 2-grams 7/8, 3-grams 5/6, 4-grams 3/4 -> geometric mean x 100
    assert m["bleu"] == pytest.approx(100 * (9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25, abs=1e-3)  # 83.759
    # ROUGE F1 per pair, averaged: unigrams 5/6 and 1; bigrams 4/5 and 1; LCS 5/6 and 1
    assert m["rouge1"] == pytest.approx(100 * (5 / 6 + 1) / 2, abs=1e-3)
    assert m["rouge2"] == pytest.approx(100 * (4 / 5 + 1) / 2, abs=1e-3)
    assert m["rougeL"] == pytest.approx(100 * (5 / 6 + 1) / 2, abs=1e-3)
    assert m["accuracy"] == 0.5
    # exact match ignores case and surrounding / repeated whitespace, not punctuation
    assert text_metrics(["  Paris. ", "four"], ["paris.", "Four."], ["accuracy"])["accuracy"] == 0.5
    assert normalize(" A  b\n") == "a b"
    assert text_metrics(REFS, REFS, ["bleu"])["bleu"] == pytest.approx(100.0)
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)


def test_unknown_metric_is_a_clear_error():
    assert parse_metrics("perplexity, BLEU") == ["perplexity", "bleu"]
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) blue"):
        parse_metrics("perplexity,blue")


@pytest.fixture(scope="module")
def never_stops_model(tmp_path_factory):
    """A tiny Llama whose generation config suppresses every end token: its answers never stop."""
    from transformers import AutoTokenizer, GenerationConfig

    from core.templates import stop_token_ids

    out = build_tiny_model(tmp_path_factory.mktemp("never-stops"))
    tok = AutoTokenizer.from_pretrained(out)
    cfg = GenerationConfig.from_pretrained(out)
    cfg.suppress_tokens = stop_token_ids(tok, "chatml")
    cfg.save_pretrained(out)
    return out


@pytest.mark.slow  # one tiny SFT run with three generating evaluations (~30-70 s on a loaded machine)
def test_enhanced_eval_tensorboard_and_post_check_in_one_run(never_stops_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    data.mkdir()
    write_alpaca(data / "train.jsonl")
    (data / "validation.jsonl").write_text(
        "".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA[:3]))
    out = tmp_path / "run"
    p = LLMTrainingParams(
        model=str(never_stops_model), data_path=str(data), valid_split="validation", project_name=str(out),
        trainer="sft", chat_template="chatml", epochs=2, batch_size=2, gradient_accumulation=1, lr=5e-3,
        warmup_ratio=0.0, logging_steps=1, eval_strategy="epoch", save_strategy="no", log="tensorboard",
        use_enhanced_eval=True, eval_metrics="perplexity,bleu,rouge,accuracy", eval_save_predictions=True,
        eval_max_new_tokens=6, peft=True)
    assert Project(p, process=False).create() == 0

    # trainer_log.jsonl: enhanced metrics at each epoch's evaluation and at the end
    records, _ = read_log(out / "trainer_log.jsonl")
    enhanced = [r for r in records if "eval_bleu" in r]
    assert [r["step"] for r in enhanced] == [3, 6, 6], enhanced
    for r in enhanced:
        for k in ("eval_perplexity", "eval_rouge1", "eval_rougeL", "eval_accuracy", "eval_stopped_fraction"):
            assert k in r, (k, r)
        assert r["eval_stopped_fraction"] == 0.0  # the model cannot stop
    # perplexity is exp(eval_loss) of the same evaluation
    losses = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    assert enhanced[0]["eval_perplexity"] == pytest.approx(math.exp(losses[0]), rel=1e-3)

    results = json.loads((out / "eval_results.json").read_text())
    assert len(results["history"]) == 3 and results["latest"]["eval_bleu"] == enhanced[-1]["eval_bleu"]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in preds] == [a for _, a in QA[:3]]
    assert all(r["new_tokens"] == 6 and r["stopped"] is False for r in preds)
    # the metrics are those of the saved predictions
    again = text_metrics([r["prediction"] for r in preds], [r["reference"] for r in preds], ["bleu", "accuracy"])
    assert again["bleu"] == pytest.approx(results["latest"]["eval_bleu"])
    assert read_status(out)["metrics"]["eval_bleu"] == pytest.approx(results["latest"]["eval_bleu"])

    # post-training check: samples written, and a warning that answers do not stop
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and not any(s["stopped"] for s in samples)
    status = read_status(out)
    assert len(status["post_check"]["warnings"]) == 1 and "did not stop" in status["post_check"]["warnings"][0]
    assert "WARNING aitraining: post-training check: 3 of 3 sample answers did not stop within 6 new tokens" \
        in (out / "running.log").read_text()

    from webui.tabs.runs import samples_view  # what the runs tab shows for this run

    frame, note = samples_view(str(out))
    assert list(frame["reference"]) == [a for _, a in QA[:3]] and "did not stop" in note

    # TensorBoard: read the event files back
    assert not (out / "runs").exists()  # everything in one place
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/bleu",
                "eval/perplexity", "eval/rouge1", "eval/accuracy", "memory/rss_mb"):
        assert tag in tags, (tag, sorted(tags))
    train_loss = [e.value for e in acc.Scalars("train/loss")]
    logged = [r["loss"] for r in records if r.get("loss") is not None]
    assert train_loss == pytest.approx(logged, rel=1e-4)
    assert [e.value for e in acc.Scalars("eval/bleu")][-1] == pytest.approx(enhanced[-1]["eval_bleu"], rel=1e-4)
    assert len(acc.Scalars("eval/loss")) == 3  # two epochs and the final evaluation
    assert all(e.value > 10 for e in acc.Scalars("memory/rss_mb"))  # MB of a live Python process
    texts = acc.Tags()["tensors"]
    assert any(t.startswith("samples") for t in texts), texts
    sample_tag = next(t for t in texts if t.startswith("samples"))
    text = acc.Tensors(sample_tag)[-1].tensor_proto.string_val[0].decode()
    assert QA[0][0] in text and "| prompt | answer |" in text


def test_post_check_warns_when_the_saved_template_differs(tiny_model_dir, tmp_path):
    """The template check compares the tokenizer saved in the run with the template trained with."""
    from transformers import AutoTokenizer

    from core.evaluate import post_train_check
    from core.templates import attach_template

    run = tmp_path / "run"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    attach_template(tok, "llama3")
    tok.save_pretrained(run)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = write_alpaca(tmp_path / "train.jsonl", n=2)
    p = LLMTrainingParams(model=str(tiny_model_dir), data_path=str(data), project_name=str(run),
                          eval_max_new_tokens=3)
    same = post_train_check(p, run, model, tok, "llama3")
    assert not any("chat template differs" in w for w in same["warnings"])
    other = post_train_check(p, run, model, tok, "chatml")
    assert any("chat template differs" in w for w in other["warnings"])


def test_eval_subcommand_writes_predictions_and_metrics(tiny_model_dir, tmp_path):
    data = write_alpaca(tmp_path / "qa.jsonl", n=4)
    out = tmp_path / "eval-out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "core.cli", "eval", "--model", str(tiny_model_dir),
                           "--data-path", str(data), "--chat-template", "chatml", "--max-new-tokens", "5",
                           "--temperature", "0.8", "--top-p", "0.9", "--batch-size", "3", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["reference"]) for r in rows] == QA[:4]
    assert all(0 < r["new_tokens"] <= 5 and isinstance(r["prediction"], str) for r in rows)
    result = json.loads((out / "eval_results.json").read_text())
    assert result["n_examples"] == 4 and result["temperature"] == 0.8 and result["template"] == "chatml"
    m = result["metrics"]
    assert set(m) >= {"bleu", "rouge1", "rouge2", "rougeL", "accuracy", "perplexity", "loss"}
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-3)
    # a random model: perplexity near the vocabulary size's order, not 1
    assert m["perplexity"] > 10
    recomputed = text_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows], ["rouge", "accuracy"])
    assert recomputed["rouge1"] == pytest.approx(m["rouge1"]) and recomputed["accuracy"] == m["accuracy"]
    assert "predictions" in proc.stdout



def test_eval_subcommand_refuses_unknown_metric_before_loading(capsys, tmp_path):
    from core.cli import main

    data = write_alpaca(tmp_path / "qa.jsonl", n=2)
    assert main(["eval", "--model", str(tmp_path / "no-such-model"), "--data-path", str(data),
                 "--metrics", "bleu,f1"]) == 2
    assert "unknown metric(s) f1" in capsys.readouterr().err
