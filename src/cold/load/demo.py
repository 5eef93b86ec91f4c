"""Built-in demo adapters, trained by `cold.training` and shipped inside the package."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_adapters"  # cold/demo_adapters

# built-in model name -> task -> demo adapter directory name; the first task is the model's default
DEMO_ADAPTERS = {
    "smollm2": {
        "gsm8k": "smollm2-gsm8k",
        "coin_flip": "smollm2-coin_flip",
        "last_letters": "smollm2-last_letters",
        "commonsenseqa": "smollm2-commonsenseqa-text",  # answers with the choice's text
    },
    "gemma3": {  # a base model: its adapter is trained on, and evaluated with, the zero-shot text prompt
        "commonsenseqa": "gemma3-commonsenseqa-text",
    },
}
# tasks whose adapter fits another task too (the public test files of the same family)
TASK_ADAPTER = {"multiarith": "gsm8k", "singleeq": "gsm8k"}


def demo_adapter_dir(model: str, task: str = "") -> Path | None:
    """The demo adapter of a built-in model for a task (default: the model's first), or None."""
    adapters = DEMO_ADAPTERS.get(model)
    if adapters is None:
        return None
    task = TASK_ADAPTER.get(task, task)
    name = adapters.get(task) if task else next(iter(adapters.values()))
    if name is None:
        return None
    path = DEMO_DIR / name
    return path if (path / "adapter_config.json").is_file() else None


def default_adapters(model: str, task: str = "") -> dict[str, str]:
    """{name: directory} of the demo adapter a command loads when the user gives none ({} if there is none)."""
    path = demo_adapter_dir(model, task)
    return {path.name: str(path)} if path else {}


def shipped_adapter_dir(name: str) -> Path | None:
    """The shipped adapter directory called `name` (any of `cold/demo_adapters`), or None."""
    path = DEMO_DIR / name
    return path if "/" not in name and (path / "adapter_config.json").is_file() else None
