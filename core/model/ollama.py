"""An Ollama Modelfile beside a GGUF: the chat template as an Ollama (Go text/template) TEMPLATE and
the template's stop words as `PARAMETER stop`, both from our templates/ registry.

Ollama renders `.Messages` with Go templates, not Jinja, so each of our templates has its Go twin
below, written to produce the same text as templates/<name>.jinja (without the bos: llama.cpp adds
it from the GGUF's add_bos flag). The eos always stops generation in llama.cpp; stop words add the
end-of-turn markers that are not the eos.
"""
from __future__ import annotations

from pathlib import Path

# The system prompt (if any) as $system, and the turns without it.
_SYSTEM = '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}{{- end }}\n'

GO_TEMPLATES = {
    "chatml": (
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n'),
    "llama3": (
        '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n'),
    "gemma": _SYSTEM + (
        '{{- $first := true }}{{- range .Messages }}'
        '{{- if eq .Role "user" }}<start_of_turn>user\n{{ if and $first $system }}{{ $system }}\n\n{{ end }}'
        '{{ .Content }}<end_of_turn>\n{{ $first = false }}'
        '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        '{{- end }}{{- end }}<start_of_turn>model\n'),
    "mistral": _SYSTEM + (
        '{{- $first := true }}{{- range .Messages }}'
        '{{- if eq .Role "user" }}[INST] {{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }} [/INST]'
        '{{ $first = false }}{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}'),
    "phi": (
        '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n'),
    "deepseek": _SYSTEM + (
        '{{ $system }}{{- range .Messages }}{{- if eq .Role "user" }}<｜User｜>{{ .Content }}'
        '{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>'
        '{{- end }}{{- end }}<｜Assistant｜>'),
    "alpaca": _SYSTEM + (
        '{{ if $system }}{{ $system }}{{ else }}Below is an instruction that describes a task. Write a '
        'response that appropriately completes the request.{{ end }}\n\n'
        '{{- range .Messages }}{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
        '{{- else if eq .Role "assistant" }}{{ .Content }}\n\n{{- end }}{{- end }}'),
    "vicuna": _SYSTEM + (
        "{{ if $system }}{{ $system }}{{ else }}A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
        "{{ end }} {{- range .Messages }}{{- if eq .Role \"user\" }} USER: {{ .Content }}"
        "{{- else if eq .Role \"assistant\" }} ASSISTANT: {{ .Content }}</s>{{- end }}{{- end }} ASSISTANT:"),
    "empty": '{{- range .Messages }}{{ .Content }}{{ end }}',
}


def template_name_for(tokenizer, chat_template: str | None = None, model_type: str | None = None) -> str | None:
    """Our template name for a choice (name, 'auto', None) and a tokenizer: the tokenizer's own
    template when it is one of ours, else the family default; None when it matches none of ours."""
    from core import templates

    if chat_template and chat_template not in ("auto", "tokenizer"):
        if chat_template == "none":
            return "empty"
        return templates.load_template(chat_template).name
    source = templates.resolve_chat_template(chat_template, tokenizer, model_type)
    for key in templates.list_templates():
        t = templates.load_template(key)
        if source and t.source.strip() == source.strip():
            return t.name
    return None


def modelfile_text(gguf_name: str, template: str | None, eos_token: str | None = None) -> str:
    """Modelfile content for a GGUF in the same directory."""
    from core import templates

    lines = [f"FROM ./{gguf_name}", ""]
    if template is None or template not in GO_TEMPLATES:
        lines += ["# The model's chat template is not one of aitraining's templates: write its TEMPLATE",
                  "# here (Ollama Go template syntax) before `ollama create`.", ""]
        stops = []
    else:
        lines += [f'TEMPLATE """{GO_TEMPLATES[template]}"""', ""]
        stops = list(templates.load_template(template).stop_words)
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path, template: str | None, eos_token: str | None = None) -> Path:
    gguf_path = Path(gguf_path)
    path = gguf_path.parent / "Modelfile"
    path.write_text(modelfile_text(gguf_path.name, template, eos_token), encoding="utf-8")
    return path
