"""The bad-input corpus (tests/corpus/cases.yaml, 90+ cases) through the CLI and the web UI.

Every case must give a clear error: exit code 2, no traceback, one paragraph naming the file /
record / field and the fix, raised before any run starts; in the web UI (the real handlers of
build_app: Start, dataset preview, Import YAML) a red error box, no handler exception, and the
UI still answers afterwards. Most cases run in process through core.cli.main; a representative
subset also runs as real `python -m core.cli` processes. The counts go in README's Reliability table.
"""
import json

import pytest

from corpus import harness

# one per door: argparse, a run YAML, a data file, dataset_info.json, a model directory
SUBPROCESS_CASES = ["unknown_cli_flag", "yaml_unknown_params_key", "non_utf8_bytes",
                    "info_file_name_escapes", "model_dir_without_config"]
CATEGORIES = {  # the issue's list: at least one case each
    "invalid JSON/JSONL": ["jsonl_invalid_line", "json_syntax_error"],
    "wrong top-level type": ["json_top_level_object", "jsonl_record_is_a_list"],
    "missing columns": ["missing_output_column"], "empty fields": ["empty_instruction"],
    "role order": ["wrong_role_order"], "system not first": ["system_not_first"],
    "unknown roles": ["unknown_role"], "mixed formats": ["mixed_formats_in_one_file"],
    "non-UTF-8": ["non_utf8_bytes"], "0-byte file": ["zero_byte_file"], "huge record": ["huge_single_record"],
    "ragged CSV": ["csv_ragged_rows"], "parquet types": ["parquet_wrong_types"],
    "images": ["image_renamed_to_jsonl", "parquet_image_bytes_column"],
    "dataset_info bad JSON": ["info_bad_json"], "unknown formatting": ["info_unknown_formatting"],
    "columns pointing nowhere": ["info_column_points_nowhere"], "../ escape": ["info_file_name_escapes"],
    "unknown keys": ["yaml_unknown_params_key", "unknown_cli_flag"], "wrong types": ["yaml_wrong_type"],
    "zero/negative batch, lr, epochs": ["zero_batch_size", "negative_lr", "zero_epochs"],
    "unsloth+dpo": ["unsloth_with_dpo"], "packing without block size": ["packing_without_block_size"],
    "missing model path": ["model_path_missing"], "no config.json": ["model_dir_without_config"],
    "no chat template": ["tokenizer_without_chat_template"], "teacher vocab": ["teacher_vocab_mismatch"],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir):
    env = harness.Env(tmp_path_factory.mktemp("corpus"), tiny_model_dir)
    rep = harness.run_corpus(env, SUBPROCESS_CASES)
    print("\nbad-input corpus:", json.dumps(harness.counts(rep)), "seconds:", rep["seconds"])
    return rep


def test_the_corpus_covers_the_issue():
    cases = harness.load_cases()
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names))
    assert len([c for c in cases if not c.get("skip")]) >= 40
    for what, wanted in CATEGORIES.items():
        assert set(wanted) <= set(names), what
    for c in cases:
        assert c.get("expect"), c["name"]
        assert c.get("ui", True) or c.get("ui_reason"), c["name"]


def test_every_case_is_a_clear_error_from_the_cli(report):
    c = harness.counts(report)
    assert not harness.failures({**report, "ui": {}}), "\n".join(harness.failures({**report, "ui": {}}))
    assert c["cli_clear"] == c["tried"] >= 40 and c["cli_tracebacks"] == 0
    assert c["subprocess_clear"] == c["subprocess_tried"] == len(SUBPROCESS_CASES)
    # the message names the file and the record (data cases) and says how to fix it
    msg = report["cli"]["non_utf8_bytes"]["message"]
    assert "train.jsonl, record 3" in msg and "Fix:" in msg and "\n" not in msg.strip()
    assert report["subprocess"]["non_utf8_bytes"]["rc"] == 2


def test_every_case_is_a_red_message_in_the_web_ui(report):
    c = harness.counts(report)
    ui_failures = [f for f in harness.failures(report) if f.startswith("ui ")]
    assert not ui_failures, "\n".join(ui_failures)
    assert c["ui_red"] == c["ui_tried"] >= 40 and c["ui_crashes"] == 0
    assert report["ui_alive_after"]
