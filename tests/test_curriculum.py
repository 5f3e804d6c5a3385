"""--curriculum: the training dataloader visits examples easy -> hard (by token length or a column)
for --curriculum-epochs epochs, then shuffles."""
import json

import pytest

from core import LLMTrainingParams, Project
from core.errors import ConfigError, DataError
from core.stages import sft

from conftest import QA


def _params(tiny_model_dir, data, tmp_path, **kw):
    return LLMTrainingParams(model=str(tiny_model_dir), data_path=str(data), project_name=str(tmp_path / "run"),
                             trainer="sft", chat_template="chatml", batch_size=1, gradient_accumulation=1,
                             epochs=3, log="none", eval_strategy="no", save_strategy="no", **kw)


def _epochs(trainer, n):
    """The order of examples (as input_ids tuples) the dataloader yields, epoch by epoch."""
    loader = trainer.get_train_dataloader()
    out = []
    for epoch in range(n):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        out.append([tuple(b["input_ids"][0].tolist()) for b in loader])
    return out


def test_length_curriculum_sorted_then_shuffled(tiny_model_dir, tmp_path):
    rows = [{"instruction": q * (1 + i % 3), "input": "", "output": a} for i, (q, a) in enumerate(QA)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, *_ = sft.build_trainer(_params(tiny_model_dir, data, tmp_path, curriculum="length",
                                            curriculum_epochs=2), tmp_path / "run")
    first, second, third = _epochs(trainer, 3)
    lengths = [len(x) for x in first]
    assert lengths == sorted(lengths) and len(set(lengths)) > 3, lengths
    assert second == first  # two curriculum epochs
    assert sorted(third) == sorted(first) and third != first  # then a shuffled epoch of the same examples


def test_column_curriculum_follows_the_column(tiny_model_dir, tmp_path):
    levels = [3, 1, 2, 0, 5, 4]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a, "level": lv}) + "\n"
                            for (q, a), lv in zip(QA, levels)))
    trainer, tok, *_ = sft.build_trainer(_params(tiny_model_dir, data, tmp_path, curriculum="level"),
                                         tmp_path / "run")
    first, = _epochs(trainer, 1)
    order = sorted(range(len(QA)), key=lambda i: levels[i])  # 3, 1, 2, 0, 5, 4
    texts = [tok.decode(list(ids)) for ids in first]
    for text, i in zip(texts, order):
        assert QA[i][0] in text, (text, QA[i])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "q", "input": "", "output": "a", "level": "hard"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, record 1, field 'level'.*not a number"):
        Project(_params(tiny_model_dir, bad, tmp_path, curriculum="level"), process=False).create()


def test_curriculum_is_refused_for_other_trainers(tiny_model_dir, tmp_path):
    p = LLMTrainingParams(model=str(tiny_model_dir), data_path="demo_pretrain", trainer="pt", curriculum="length",
                          project_name=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="--curriculum orders SFT examples"):
        Project(p, process=False).check()
