"""Push a run's model (or an export) to the Hugging Face Hub through huggingface_hub.

    push_folder("./models/my-run/merged", "ada/my-run", token=None)   # token: HF_TOKEN when None

Private repositories by default; the repo is `{username}/{project-name}` (seed 000). A model card
(README.md) is written first when the folder has none. The token goes to huggingface_hub in
memory only: it is never written to a file, never logged, and removed from error messages. An
unreachable hub or a rejected token is a ConfigError (one paragraph, exit code 2), not a traceback.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from core.errors import ConfigError

log = logging.getLogger(__name__)


def repo_id_for(username: str, project_name: str) -> str:
    name = Path(str(project_name).rstrip("/\\")).name or "model"
    return f"{username}/{name}"


def model_card(repo_id: str, *, base_model: str | None = None, trainer: str | None = None,
               method: str | None = None, chat_template: str | None = None, extra: str = "") -> str:
    """A short model card: YAML front matter the hub reads, then how the model was made and used."""
    meta = ["---", "library_name: transformers", "tags:", "- aitraining"]
    if trainer:
        meta.append(f"- {trainer}")
    if method == "lora":
        meta.append("- lora")
    if base_model and not Path(base_model).exists():  # a hub id: the hub links the base model
        meta.append(f"base_model: {base_model}")
    meta.append("---")
    body = [f"# {repo_id.split('/')[-1]}", "",
            f"Fine-tuned with aitraining{f' ({trainer} trainer' + (', LoRA' if method == 'lora' else '') + ')' if trainer else ''}"
            f"{f' from `{base_model}`' if base_model else ''}.", ""]
    if chat_template:
        body += [f"Chat template: `{chat_template}` (stored in the tokenizer, so "
                 "`tokenizer.apply_chat_template` renders prompts as in training).", ""]
    body += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'tok = AutoTokenizer.from_pretrained("{repo_id}")',
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", ""]
    if extra:
        body += [extra, ""]
    return "\n".join(meta + [""] + body)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_folder(folder, repo_id: str, *, token: str | None = None, private: bool = True,
                card: str | None = None, commit_message: str = "Upload from aitraining",
                ignore_patterns: list[str] | None = None) -> str:
    """create_repo (private, exist_ok) + upload_folder; returns the repo URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"push to hub: {folder} is not a directory (nothing to upload)")
    token = token or os.environ.get("HF_TOKEN") or None
    if not token:
        raise ConfigError("push to hub needs a token: pass --token or set HF_TOKEN "
                          "(create one at https://huggingface.co/settings/tokens with write access)")
    if card is not None and not (folder / "README.md").exists():
        (folder / "README.md").write_text(card, encoding="utf-8")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message,
                          ignore_patterns=ignore_patterns or ["checkpoint-*", "*.tmp", ".*"])
    except OfflineModeIsEnabled:
        raise ConfigError("push to hub: HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls. "
                          "Fix: unset HF_HUB_OFFLINE to push (or push later)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = (" Fix: check --token (it needs write access) and --username" if status in (401, 403)
                else "")
        raise ConfigError(_scrub(f"push to hub {endpoint}/{repo_id} failed (HTTP {status}): "
                                 f"{str(e).splitlines()[0]}.{hint}", token)) from None
    except (OSError, ConnectionError) as e:
        raise ConfigError(_scrub(f"the hub at {endpoint} is unreachable ({type(e).__name__}: {e}). "
                                 "Fix: check the network (or HF_ENDPOINT), or export locally with "
                                 "`aitraining export` and push later", token)) from None
    except Exception as e:  # httpx transport errors are not OSErrors
        if type(e).__module__.split(".")[0].rstrip("0123456789") in ("httpx", "httpcore", "requests", "urllib3"):
            raise ConfigError(_scrub(f"the hub at {endpoint} is unreachable ({type(e).__name__}: {e}). "
                                     "Fix: check the network (or HF_ENDPOINT), or export locally with "
                                     "`aitraining export` and push later", token)) from None
        raise
    log.info("pushed %s to %s (private=%s)", folder, repo_id, private)
    return str(url)
