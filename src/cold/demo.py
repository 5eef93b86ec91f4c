"""Built-in demo adapters, trained by `cold.training` and shipped inside the package."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo_adapters"

# built-in model name -> demo adapter directory name
DEMO_ADAPTERS = {"smollm2": "smollm2-gsm8k"}


def demo_adapter_dir(model: str) -> Path | None:
    """The demo adapter of a built-in model, or None when the model has none."""
    name = DEMO_ADAPTERS.get(model)
    if name is None:
        return None
    path = DEMO_DIR / name
    return path if (path / "adapter_config.json").is_file() else None
