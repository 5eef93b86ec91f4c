"""Where files live: the cache directory, and the public task data beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/cold/load/paths.py -> the repository


def cache_dir() -> Path:
    """Where converted models and generated task splits live (`$COLD_CACHE_DIR` overrides the user cache directory)."""
    return Path(os.environ.get("COLD_CACHE_DIR") or user_cache_dir("cold"))


def data_root() -> Path:
    """The public task data: `$COLD_DATA_DIR`, else `../shared/data` beside the repository, else beside the
    working directory (the first that exists; the repository's when neither does)."""
    if os.environ.get("COLD_DATA_DIR"):
        return Path(os.environ["COLD_DATA_DIR"])
    beside_repo = REPO_ROOT.parent / "shared" / "data"
    for candidate in (beside_repo, Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return beside_repo
