"""Where the web UI may read and write: runs only under --runs-dir, datasets only under --data-dir.

Whoever can open the page can type any path into a text box (or call the queue directly), so every
handler that writes or lists files checks its path here first. Reading a model from anywhere stays
allowed (that is the point of the model box); writing, listing and uploading do not.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from core.errors import ConfigError, UserError
from core.params import LLMTrainingParams


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str, flag: str, *,
           allow_root: bool = True) -> Path:
    """path resolved (relative paths are taken inside root, symlinks followed); a ConfigError
    naming the field, the root and the fix when it lands outside root."""
    root = Path(root).resolve()
    text = str(path).strip()
    p = Path(text).expanduser()
    resolved = (p if p.is_absolute() else root / p).resolve()
    if resolved == root and not allow_root:
        raise ConfigError(f"{what} '{text}' is the {flag} directory itself; give the run its own "
                          f"folder, e.g. {root / 'my-run'}")
    if resolved != root and root not in resolved.parents:
        raise ConfigError(f"{what} '{text}' is outside {root}: the web UI only uses paths inside "
                          f"{flag} ({root}). Use a name like 'my-run' or a path inside it, or start "
                          f"the UI with {flag} pointing elsewhere.")
    return resolved


def _registered(data_dir: Path) -> set[str]:
    from core.data.registry import load_dataset_info

    try:
        return set(load_dataset_info(data_dir, check_files=False))
    except UserError:
        return set()  # the run's own data check reports the broken registry


def confine(params: LLMTrainingParams, runs_root: Path, data_root: Optional[Path]) -> LLMTrainingParams:
    """params with the run directory inside runs_root and, when data_root is given, the dataset
    directory and every dataset file inside it (relative names are taken inside the roots)."""
    update = {"project_name": str(inside(runs_root, params.project_name, "project_name (output directory)",
                                          "--runs-dir", allow_root=False))}
    if data_root is not None:
        ddir = inside(data_root, params.dataset_dir or data_root, "dataset_dir", "--data-dir")
        names = _registered(ddir)
        parts = [s.strip() for s in params.data_path.split(",") if s.strip()]
        update["dataset_dir"] = str(ddir)
        update["data_path"] = ",".join(
            s if s in names else str(inside(data_root, s, "data_path entry", "--data-dir")) for s in parts)
    return params.model_copy(update=update)
