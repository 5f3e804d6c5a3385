"""aitraining core: the training engine behind the CLI, the web UI and the Python API.

    from core import LLMTrainingParams, Project
    params = LLMTrainingParams(model="google/gemma-3-270m", data_path="identity",
                               project_name="./models/my-first", peft=True)
    Project(params, backend="local", process=True).create()
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # repository root: data/, templates/ live here
DATA_DIR = ROOT / "data"
TEMPLATES_DIR = ROOT / "templates"

__all__ = ["LLMTrainingParams", "Project", "ROOT", "DATA_DIR", "TEMPLATES_DIR"]


def __getattr__(name):  # lazy: `import core` must stay cheap (no torch) for the CLI's --help
    if name == "LLMTrainingParams":
        from core.params import LLMTrainingParams

        return LLMTrainingParams
    if name == "Project":
        from core.project import Project

        return Project
    raise AttributeError(name)
