"""llama-cpp-python, imported once: a clear error naming the extra when it is missing, its CPU
backends loaded (a build with runtime-dispatched CPU variants ships them as plugins), and
llama.cpp's own logging kept to errors."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from cold.errors import ColdError

EXTRA = "pip install 'cold-decoding[llamacpp]'"  # what a user runs when llama-cpp-python is missing
GGML_LOG_LEVEL_ERROR = 4
# CPU variants whose matrix kernels use AMX tiles; on the 2-core Xeon VM we develop on, llama.cpp's
# AMX kernel dies of SIGILL at its first tile load (docs/llamacpp.md), so they are opt-in
AMX_VARIANTS = ("sapphirerapids",)
AMX_OPT_IN = "COLD_LLAMACPP_AMX"  # =1: let llama.cpp pick an AMX variant where the CPU reports AMX


@functools.cache
def llama():
    """The `llama_cpp` module with its backend initialised (once per process)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ColdError(f"--engine llamacpp needs llama-cpp-python: {EXTRA} "
                        f"(compiles llama.cpp, about 15 minutes on 2 cores, once; see docs/llamacpp.md) ({exc})") from exc
    _quiet(llama_cpp)
    _load_backends(Path(llama_cpp.__file__).parent / "lib")
    llama_cpp.llama_backend_init()
    return llama_cpp


def _variant_dirs(lib_dir: Path) -> list[Path]:
    """Where a GGML_BACKEND_DL build's libggml-cpu-*.so variants lie (none for a native build)."""
    return [d for d in (lib_dir, lib_dir.parent.parent / "bin") if any(d.glob("libggml-cpu-*.so"))]


def _load_backends(lib_dir: Path) -> None:
    """Register the CPU backend variant that a GGML_BACKEND_DL build ships as libggml-cpu-*.so
    (llama-cpp-python's wheel puts them in site-packages/bin): the best one this CPU runs, by each
    variant's own score, leaving out AMX_VARIANTS unless AMX_OPT_IN is 1. A build with one CPU
    backend linked in (pip's default, -march=native) has none of these files and needs nothing."""
    directories = _variant_dirs(lib_dir)
    if not directories:
        return
    ggml = _ggml(lib_dir)
    if os.environ.get(AMX_OPT_IN) == "1":
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(directories[0]).encode())
    elif (best := _best_variant(directories[0])) is not None:
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        ggml.ggml_backend_load(str(best).encode())


def _best_variant(directory: Path) -> Path | None:
    """The libggml-cpu-*.so in `directory`, AMX_VARIANTS left out, with the highest score on this CPU
    (`ggml_backend_score`: 0 where it does not run), as llama.cpp's own loader picks among all."""
    scores = {}
    for path in directory.glob("libggml-cpu-*.so"):
        if path.stem.removeprefix("libggml-cpu-") in AMX_VARIANTS:
            continue
        try:
            score = ctypes.CDLL(str(path)).ggml_backend_score
        except (OSError, AttributeError):  # not loadable here, or not a variant
            continue
        score.restype = ctypes.c_int
        scores[path] = score()
    best = max(scores, key=scores.get, default=None)
    return best if best is not None and scores[best] > 0 else None


def _ggml(lib_dir: Path) -> ctypes.CDLL:
    """The libggml that libllama links to, by its soname (libggml.so.0): the wheel holds copies,
    not links, under several names, and another copy has its own empty backend registry."""
    names = sorted((p.name for p in lib_dir.glob("libggml.so*")), key=len)
    soname = next((n for n in names if n.count(".") == 2), "libggml.so")  # libggml.so.0
    return ctypes.CDLL(str(lib_dir / soname))


def _quiet(llama_cpp) -> None:
    """Forward only llama.cpp's errors to stderr (it logs every load and context at info level)."""

    @llama_cpp.llama_log_callback
    def log(level, text, _user_data):
        if level == GGML_LOG_LEVEL_ERROR:
            import sys

            sys.stderr.write(text.decode("utf-8", "replace"))

    _quiet.callback = log  # keep the ctypes callback alive
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def system_info() -> str:
    """The CPU features of the llama.cpp backend in use (for benchmark tables), e.g. "CPU: AVX2 AVX512 ...".
    With runtime-dispatched variants these are the chosen variant's."""
    import llama_cpp

    llama()
    ggml = _ggml(Path(llama_cpp.__file__).parent / "lib")
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    parts = []
    for index in range(ggml.ggml_backend_reg_count()):
        reg = ggml.ggml_backend_reg_get(index)
        address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
        features = []
        if address:
            table = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(address)(reg)
            i = 0
            while table[i].name:
                features.append(table[i].name.decode() if table[i].value == b"1" else f"{table[i].name.decode()}={table[i].value.decode()}")
                i += 1
        parts.append(f"{ggml.ggml_backend_reg_name(reg).decode()}: {' '.join(features)}")
    return "; ".join(parts)


def build_info() -> dict:
    """llama-cpp-python's version, how its CPU code was built, and the features in use (benchmark tables)."""
    import llama_cpp

    variants = _variant_dirs(Path(llama_cpp.__file__).parent / "lib")
    count = len(list(variants[0].glob("libggml-cpu-*.so"))) if variants else 0
    return {"version": llama_cpp.__version__, "features": system_info(),
            "cpu_build": f"{count} runtime-dispatched CPU variants (GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS)" if count
            else "one CPU backend built for the build machine (GGML_NATIVE, pip's default)"}
