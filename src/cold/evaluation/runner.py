"""Run decoders on the same problems; one resumable JSONL record file per decoder.

    OUT/run.json                 the settings every record depends on (checked on every rerun)
    OUT/records/<decoder>.jsonl  one line per finished problem, appended after every batch
    OUT/.lock                    held by the run writing into OUT

A rerun with the same OUT reads the record files and generates only the problems that have no
record yet (a larger --limit with the same --seed extends the sample; new decoders are added).
A rerun whose settings differ (model, adapter, task file, prompt, max tokens, ...) is refused
rather than mixing two experiments. Answers are re-extracted from the stored output on every
load, so a change of the extraction rules re-scores old records without generating again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

from cold.errors import ColdError
from cold.evaluation.decoders import DecoderSpec
from cold.load.paths import check_writable
from cold.tasks.extract import RULES, extract, is_correct
from cold.tasks.prompts import PromptStyle
from cold.tasks.readers import Problem

SCHEMA = "cold-eval/1"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
RECORDS_DIR = "records"

Progress = Callable[[str, int, int], None]  # (decoder label, problems done, problems in total)


# ---- run settings ----------------------------------------------------------------------------


class RunDir:
    """A run directory, checked against `settings` when opened; nothing is written until `start()`.

    `start()` (called once the engine has loaded, right before the first records are written)
    creates the directory, takes its lock (`OUT/.lock`: a second run writing into the same OUT is
    refused rather than storing every record twice) and records `run.json` for a new run. So a run
    that fails on its inputs (a corrupt adapter, a model that does not load) leaves nothing behind.
    Keys in `informational` (e.g. file paths, which change between machines) are recorded but not
    compared; the files' fingerprints are compared instead. Use it as a context manager, or `close()`.
    """

    def __init__(self, path: Path, settings: dict | None = None, informational: Sequence[str] = ()):
        self.path = Path(path)
        self.settings = {"schema": SCHEMA, **settings} if settings is not None else None
        self.informational = tuple(informational)
        self._lock: FileLock | None = None
        check_writable(self.path, "--out", directory=True)
        self._check_settings()

    def start(self) -> None:
        """Create OUT, lock it and write run.json if new (ColdError when another run holds the lock)."""
        if self._lock is not None:
            return
        try:
            (self.path / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ColdError(f"--out {self.path}: cannot create the directory ({exc.strerror or exc})") from None
        lock = FileLock(self.path / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ColdError(f"--out {self.path}: another run is writing into it; wait for it to finish or use another --out") from None
        self._lock = lock
        self._check_settings()  # a run that held the lock before may have recorded other settings
        if self.settings is not None and not (self.path / RUN_FILE).is_file():
            _write_atomic(self.path / RUN_FILE, json.dumps(self.settings, indent=2) + "\n")

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_settings(self) -> None:
        run_file = self.path / RUN_FILE
        if self.settings is None or not run_file.is_file():
            return
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ColdError(f"{run_file}: not valid JSON; remove it or use another --out") from None
        if not isinstance(old, dict):
            raise ColdError(f"{run_file}: not a run file of `cold eval`; remove it or use another --out")
        new = self.settings
        differ = [k for k in sorted(set(old) | set(new)) if k not in self.informational and old.get(k) != new.get(k)]
        if differ:
            details = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in differ)
            raise ColdError(f"--out {self.path} holds a run with other settings ({details}); use another --out or delete it")


def open_run_dir(out: Path, settings: dict, informational: Sequence[str] = ()) -> RunDir:
    """The run directory OUT for `settings`: refused now when it holds a run with other settings."""
    return RunDir(out, settings, informational)


# ---- records ---------------------------------------------------------------------------------


class RecordFile:
    """One decoder's records: JSON lines keyed by problem id, appended batch by batch."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        """Records by problem id. A cut-off last line (an interrupted write) is ignored."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        found: dict[str, dict] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # no newline after it: the write was interrupted
                    continue
                raise ColdError(f"{self.path}:{number}: not valid JSON; remove the line (or the file) to regenerate it") from None
            if not isinstance(record, dict) or "id" not in record or "output" not in record:
                raise ColdError(f"{self.path}:{number}: not a record of `cold eval` (no 'id' / 'output')")
            found[str(record["id"])] = record
        return found

    def append(self, records: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_cut_line(self.path)
        with self.path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def rewrite(self, records: Sequence[dict]) -> None:
        _write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _drop_cut_line(path: Path) -> None:
    """Remove what an interrupted write left after the last complete line."""
    if not path.is_file():
        return
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0 or (handle.seek(size - 1), handle.read(1))[1] == b"\n":
            return
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def score(record: dict, problem: Problem, answer_type: str) -> dict:
    """Fill in gold, extracted answers and correctness from the record's output."""
    answers = {rule: extract(record["output"], answer_type, rule, problem.choices) for rule in RULES}
    record["gold"] = problem.gold
    record["answer"] = answers
    record["correct"] = {rule: is_correct(answers[rule], problem.gold) for rule in RULES}
    return record


# ---- generation ------------------------------------------------------------------------------


def run_decoders(
    engine,
    problems: Sequence[Problem],
    decoders: Sequence[DecoderSpec],
    style: PromptStyle,
    answer_type: str,
    out: Path | RunDir,
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: Progress | None = None,
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Generate what is missing; return (records of each decoder in problem order, new generations per decoder).

    `engine` needs only `generate(prompts, chat=..., stop=..., max_new_tokens=..., **decoder kwargs)`
    returning objects with `.text`, `.token_ids`, `.finish_reason` and optionally `.amateur_steps`
    (cold.decoding.engine.Engine); if it has a `load()` method, that is called before the first timed batch.
    Problems are batched in order of prompt length (less padding); every decoder gets the same batches.
    The run directory is started (locked, run.json written) once the engine has loaded, before the
    first batch; the records are read again then, in case another run wrote them meanwhile.
    """
    if batch_size < 1:
        raise ColdError(f"--batch-size must be >= 1, got {batch_size}")
    run_dir = out if isinstance(out, RunDir) else RunDir(out)
    with contextlib.nullcontext() if run_dir is out else run_dir:  # a RunDir made here is closed here
        prompts = {p.id: style.render(p) for p in problems}
        results: dict[str, list[dict]] = {}
        generated: dict[str, int] = {}
        started = False
        for spec in decoders:
            store = RecordFile(run_dir.path / RECORDS_DIR / spec.filename)
            done, pending = _split_done(store, problems, prompts)
            if pending and hasattr(engine, "load"):
                engine.load()  # a lazily loaded model: not inside the first batch's time
            if pending and not started:
                run_dir.start()
                started = True
                done, pending = _split_done(store, problems, prompts)
            if progress:
                progress(spec.label, len(done), len(problems))
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                began = time.perf_counter()
                outputs = engine.generate(
                    [prompts[p.id] for p in batch], chat=style.chat, stop=style.stop,
                    max_new_tokens=max_new_tokens, **spec.generate_kwargs(),
                )
                seconds = time.perf_counter() - began
                new = [
                    score({
                        "id": p.id, "decoder": spec.label, "prompt": prompts[p.id], "chat": style.chat,
                        "output": g.text, "tokens": len(g.token_ids), "finish_reason": g.finish_reason,
                        "hit_max": g.finish_reason == "length", "time_s": seconds / len(batch), "batch_size": len(batch),
                        **amateur_fields(g),
                    }, p, answer_type)
                    for p, g in zip(batch, outputs)
                ]
                store.append(new)
                done.update((r["id"], r) for r in new)
                if progress:
                    progress(spec.label, len(done), len(problems))
            generated[spec.label] = len(pending)
            results[spec.label] = _rescored(store, done, problems, answer_type)
    return results, generated


def _split_done(store: RecordFile, problems: Sequence[Problem], prompts: dict[str, str]) -> tuple[dict[str, dict], list[Problem]]:
    """(records of `problems` already in `store`, the problems without one, shortest prompt first)."""
    by_id = {p.id for p in problems}
    done = {i: r for i, r in store.load().items() if i in by_id}
    pending = sorted((p for p in problems if p.id not in done),
                     key=lambda p: (len(prompts[p.id]), int(p.id) if p.id.isdigit() else 0, p.id))
    return done, pending


def amateur_fields(generation) -> dict:
    """`amateur_steps` (CoLD: steps whose plausibility mask left more than one token, so the amateur's
    logits were needed) and `amateur_fraction` (of the generated tokens); both None for other decoders.
    Records of older runs lack both: readers take a missing field as None."""
    steps = getattr(generation, "amateur_steps", None)
    tokens = len(generation.token_ids)
    return {"amateur_steps": steps, "amateur_fraction": steps / tokens if steps is not None and tokens else None}


def _rescored(store: RecordFile, done: dict[str, dict], problems: Sequence[Problem], answer_type: str) -> list[dict]:
    """Records in problem order, re-extracted with the current rules (the file rewritten if that changed anything)."""
    changed = False
    for problem in problems:
        record = done[problem.id]
        before = (record.get("gold"), record.get("answer"), record.get("correct"))
        score(record, problem, answer_type)
        changed |= before != (record["gold"], record["answer"], record["correct"])
    if changed:
        everything = store.load()
        everything.update(done)
        store.rewrite(list(everything.values()))
    return [done[p.id] for p in problems]
