"""Where files live: the cache directory, and the public task data beside the repository."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from filelock import FileLock
from platformdirs import user_cache_dir

from cold.errors import ColdError

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


@contextlib.contextmanager
def building(target: Path):
    """Hold `<target>.lock` while `target` (a cache entry) is built: a second process that wants the
    same entry waits, then finds it built. Check for the entry again inside the block."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):
        yield


def check_writable(path: Path, option: str, directory: bool = False) -> None:
    """ColdError (naming `option`) unless `path` can be written as a directory (or a file), checked
    before any work by creating what is missing of it and removing that again."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise ColdError(f"{option} {path}: exists and is {'not ' if directory else ''}a directory")
    folder = path if directory else path.parent
    missing = []  # the folders this check creates (and removes), innermost last
    ancestor = folder
    while not ancestor.exists():
        missing.insert(0, ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ColdError(f"{option} {path}: {ancestor} is not a directory")
    try:
        for made in missing:
            made.mkdir()
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ColdError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for made in reversed(missing):
            with contextlib.suppress(OSError):
                made.rmdir()


def fingerprint(path: str | Path) -> str:
    """sha1 of a file, or of a directory's adapter files (config and weights, not its README)."""
    path = Path(path)
    digest = hashlib.sha1()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.name == "adapter_config.json" or p.suffix in (".safetensors", ".bin")
    )
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
