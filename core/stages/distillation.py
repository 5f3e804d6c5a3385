"""Knowledge distillation (--trainer distillation, or --use-distillation with --teacher-model).

The data is SFT data: conversations rendered with the student's chat template, labels masked to
the trained answer tokens. The student learns from a frozen teacher's next-token distribution
and from the labels at the same time. At every trained position (averaged per trained token):

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * CE(student, label)

T (--distill-temperature) softens both distributions so the teacher's ranking of the wrong
tokens carries signal; T^2 keeps the gradient of the KL term on the same scale as CE whatever T
is (Hinton et al., 2015). alpha (--distill-alpha) weighs imitation against the labels.

The teacher reads the same token ids as the student, so both must share a tokenizer (checked
before any model loads). It reads at most --distill-max-teacher-length tokens of each row:
positions past that window have no teacher and count only their (1 - alpha) CE term.

Logged at every logging step next to the loss (averaged over the steps since the last log):
kd_loss (T^2 * KL at temperature T, the term alpha weighs), ce_loss, and kl (KL(teacher ||
student) at temperature 1: how far the student's real distribution still is from the teacher's).
"""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from core.errors import ConfigError
from core.events import RunLogCallback
from core.params import LLMTrainingParams
from core.stages import common
from core.templates import IGNORE_INDEX

log = logging.getLogger("aitraining")


def distillation_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       temperature: float) -> dict[str, torch.Tensor]:
    """Sums over the trained tokens of a batch, without a loop over positions.

    student_logits (B, W, V); labels (B, W), IGNORE_INDEX where nothing is trained; teacher_logits
    (B, Wt, Vt) for the first Wt positions of the same rows (Wt < W when the teacher window cut
    them). Logit at position t predicts token t+1. Returns kd (sum of T^2 * KL at temperature T),
    ce (sum of cross-entropy), kl (sum of KL at temperature 1, no gradient) and n (trained tokens).
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX                                  # (B, W-1)
    s = student_logits[:, :-1][trained].float()                         # (M, V): trained positions only
    ce = F.cross_entropy(s, targets[trained], reduction="sum")

    window = min(teacher_logits.shape[1], trained.shape[1])
    in_window = trained.nonzero()[:, 1] < window                        # (M,) row-major, as s
    t = teacher_logits[:, :window][trained[:, :window]].float()         # (Mw, Vt), same order as s[in_window]
    # Same tokenizer, but the embedding matrices may be padded differently (e.g. to a multiple of
    # 64): the ids past the tokenizer never occur, so compare the columns both models have.
    vocab = min(s.shape[-1], t.shape[-1])
    s_w, t = s[in_window][:, :vocab], t[:, :vocab]
    T = float(temperature)
    # kl_div(log q, log p, log_target=True) = sum p * (log p - log q) = KL(p || q), p the teacher
    kd = F.kl_div(F.log_softmax(s_w / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
                  reduction="sum") * T * T
    with torch.no_grad():
        kl = kd.detach() if T == 1.0 else F.kl_div(F.log_softmax(s_w, dim=-1), F.log_softmax(t, dim=-1),
                                                   log_target=True, reduction="sum")
    return {"kd": kd, "ce": ce, "kl": kl, "n": trained.sum()}


class DistillationTrainer(Trainer):
    """A transformers Trainer whose loss mixes imitation of a frozen teacher with the labels."""

    def __init__(self, *args, teacher, temperature: float, alpha: float, max_teacher_length: int, **kwargs):
        super().__init__(*args, **kwargs)
        # Not part of self.model: the optimizer never sees it, checkpoints never save it, and
        # Trainer's model.train() never flips it out of eval mode (no dropout in the targets).
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.max_teacher_length = int(max_teacher_length)
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                    "eval": defaultdict(list)}

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the first max_teacher_length tokens of each row. Batches are
        padded on the right, so that window is a column slice; causal attention makes the
        logits there the same as on the whole row."""
        n = self.max_teacher_length
        with torch.no_grad():
            return self.teacher(input_ids=input_ids[:, :n], attention_mask=attention_mask[:, :n],
                                use_cache=False).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        terms = distillation_terms(outputs.logits, self.teacher_logits(input_ids, attention_mask),
                                   inputs["labels"], self.temperature)
        total = self.alpha * terms["kd"] + (1.0 - self.alpha) * terms["ce"]
        n = terms["n"].clamp(min=1)
        if num_items_in_batch is not None:
            # Trainer counted the trained tokens of the whole accumulated batch (all devices when
            # average_tokens_across_devices): dividing by that makes gradient accumulation exact,
            # and training_step then leaves the loss unscaled. DDP averages gradients over the
            # processes, which the token count already did: undo it, as Trainer does.
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / n
        mode = "train" if model.training else "eval"
        for name, term in (("kd_loss", "kd"), ("ce_loss", "ce"), ("kl", "kl")):
            self._metrics[mode][name].append((terms[term] / n).detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Train logs carry "loss", evaluation logs "eval_loss"; each gets the mean of its own
        # metrics since the previous log, so kd_loss/ce_loss/kl land on the same jsonl line.
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None:
            prefix = "eval_" if mode == "eval" else ""
            for name, values in self._metrics[mode].items():
                if values:
                    logs[prefix + name] = torch.stack(values).mean().item()
            self._metrics[mode].clear()
        super().log(logs, start_time)


def check_same_tokenizer(student_tok, teacher_tok, student: str, teacher: str) -> None:
    """The teacher's logit for id k must mean the same token as the student's: same vocabulary."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab == t_vocab:
        return
    differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:3]
    example = ", ".join(f"{tok!r}={i} only in the "
                        f"{'student' if s_vocab.get(tok) == i else 'teacher'}" for tok, i in differ)
    raise ConfigError(
        f"distillation needs the teacher and the student to share a tokenizer, but --model {student} "
        f"({len(s_vocab)} tokens) and --teacher-model {teacher} ({len(t_vocab)} tokens) have different "
        f"vocabularies (e.g. {example}). Fix: pick a teacher from the student's model family (the same "
        "tokenizer, e.g. a larger model of the same series), or a model fine-tuned from the student's base")


def load_teacher_tokenizer(params: LLMTrainingParams):
    from core.model.loader import adapter_base, is_adapter_dir, load_tokenizer, resolve_model

    src = resolve_model(params.teacher_model)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if is_adapter_dir(src) and not any((Path(src) / f).is_file() for f in tokenizer_files):
        src = resolve_model(adapter_base(src))  # an adapter saved without its tokenizer: its base's
    try:
        return load_tokenizer(src, trust_remote_code=params.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--teacher-model {params.teacher_model}: its tokenizer could not be loaded ({e}). "
                          "Fix: point to a model directory that holds its tokenizer files") from e


def build_trainer(params: LLMTrainingParams, run_dir: Path):
    """(trainer, tokenizer, chat template, has_eval): everything configured, nothing trained yet."""
    from transformers import DataCollatorForSeq2Seq, set_seed

    from core.data.tokenize import tokenize_dataset
    from core.model.loader import load_for_inference

    set_seed(params.seed)
    path, tokenizer, template, config = common.load_tokenizer_and_template(params)
    # before loading either model: a teacher with another vocabulary cannot teach this student
    check_same_tokenizer(tokenizer, load_teacher_tokenizer(params), params.model, params.teacher_model)

    train_records, eval_records = common.load_records(params, kind="sft")
    opts = dict(cutoff_len=common.cutoff_len(params, config), train_on_prompt=params.train_on_prompt,
                source=params.data_path, mask_history=params.mask_history, add_eos_token=params.add_eos_token)
    train_ds = tokenize_dataset(tokenizer, train_records, template, **opts)
    eval_ds = tokenize_dataset(tokenizer, eval_records, template, **opts) if eval_records else None
    log.info("data: %d training and %d validation examples, cutoff %d tokens (the teacher reads the "
             "first %d)", len(train_ds), len(eval_ds) if eval_ds is not None else 0, opts["cutoff_len"],
             min(opts["cutoff_len"], params.distill_max_teacher_length))

    model, dtype = common.load_trainable_model(params, path)
    args = common.training_args(params, run_dir, n_train=len(train_ds), has_eval=eval_ds is not None,
                                dtype=dtype)
    teacher, _ = load_for_inference(params.teacher_model, dtype=dtype, device=args.device,
                                    trust_remote_code=params.trust_remote_code)
    log.info("teacher %s (%s parameters, frozen); temperature %.2f, alpha %.2f", params.teacher_model,
             f"{sum(p.numel() for p in teacher.parameters()):,}", params.distill_temperature,
             params.distill_alpha)

    # The teacher's window is the first N columns of a batch only when rows are padded on the
    # right; padding side changes nothing else in training (the loss mask skips padding).
    if tokenizer.padding_side != "right":
        log.info("distillation pads training batches on the right (--padding %s is kept for the saved "
                 "tokenizer)", tokenizer.padding_side)
    collate_tok = copy.copy(tokenizer)
    collate_tok.padding_side = "right"
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(collate_tok, label_pad_token_id=IGNORE_INDEX, padding=True),
        processing_class=tokenizer, callbacks=[RunLogCallback(run_dir, "distillation")],
        teacher=teacher, temperature=params.distill_temperature, alpha=params.distill_alpha,
        max_teacher_length=params.distill_max_teacher_length,
    )
    return trainer, tokenizer, template, eval_ds is not None


def run(params: LLMTrainingParams, run_dir: Path) -> dict:
    trainer, tokenizer, template, has_eval = build_trainer(params, run_dir)
    return common.train_and_save(trainer, params, run_dir, tokenizer, template, has_eval=has_eval)
