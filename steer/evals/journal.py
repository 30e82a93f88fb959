"""The sample journal of a ``steer eval`` run: ``samples.jsonl`` and its shard files.

* ``samples.jsonl``: one JSON line per finished sample, appended (flushed and fsync'ed) as soon as its batch is
  done, so a crash or Ctrl-C loses at most the batch in flight. A half-written last line (a crash mid-write)
  is cut off before appending again (:class:`SampleWriter`).
* Under ``accelerate launch`` process ``k`` appends to ``samples.rank{k}.jsonl`` (:func:`shard_path`);
  :func:`merge_samples` merges every sample file into ``samples.jsonl`` (canonical order, one record per
  sample) and removes the shard files.

A record is a JSON object with a unique ``key``; when a key has several records, a success beats an error and
otherwise the later record wins (:func:`load_records`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError

__all__ = [
    "SAMPLES_FILE",
    "SampleWriter",
    "has_records",
    "load_records",
    "merge_samples",
    "read_samples",
    "repair",
    "sample_files",
    "shard_path",
]

SAMPLES_FILE = "samples.jsonl"
_SHARD_PREFIX, _SHARD_SUFFIX = "samples.rank", ".jsonl"


def shard_path(run_dir: Path, rank: int, world_size: int) -> Path:
    """Where process ``rank`` appends: ``samples.jsonl`` alone, ``samples.rank{k}.jsonl`` when sharded."""
    name = SAMPLES_FILE if world_size <= 1 else f"{_SHARD_PREFIX}{rank}{_SHARD_SUFFIX}"
    return Path(run_dir) / name


def _shard_rank(path: Path) -> int:
    digits = path.name[len(_SHARD_PREFIX) : -len(_SHARD_SUFFIX)]
    return int(digits) if digits.isdigit() else 1 << 30


def sample_files(run_dir: Path) -> list[Path]:
    """``samples.jsonl`` (when present) and the shard files ``samples.rank{k}.jsonl`` in rank order."""
    run_dir = Path(run_dir)
    files = [run_dir / SAMPLES_FILE] if (run_dir / SAMPLES_FILE).is_file() else []
    shards = sorted(run_dir.glob(f"{_SHARD_PREFIX}*{_SHARD_SUFFIX}"), key=_shard_rank)
    return files + shards


def read_samples(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of one sample file and the byte length of its complete part.

    A last line without its newline, or one that is not valid JSON, is the trace of a crash mid-write and is
    ignored. A malformed line in the middle is an error.
    """
    raw = Path(path).read_bytes()
    records: list[dict[str, Any]] = []
    good = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last:  # text after the final newline: a partial write (or nothing)
            break
        end = good + len(line) + 1
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 2:
                    break
                raise EvalInputError(
                    f"{path}:{i + 1}: malformed sample line; the run folder is damaged"
                ) from None
            if not isinstance(item, dict) or "key" not in item:
                raise EvalInputError(f"{path}:{i + 1}: not a sample record")
            records.append(item)
        good = end
    return records, good


def has_records(run_dir: Path) -> bool:
    """Whether any sample file of the run holds at least one complete record."""
    return any(read_samples(f)[0] for f in sample_files(run_dir))


def repair(path: Path) -> None:
    """Cut a partial last line off ``path`` so that appending starts on a fresh line."""
    if not path.is_file():
        return
    _, good = read_samples(path)
    if good != path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(good)
            fh.flush()
            os.fsync(fh.fileno())


def _prefer(old: Mapping[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` replaces ``old`` for the same key: a success beats an error, else the later one wins."""
    return old is None or not (new.get("error") and not old.get("error"))


def load_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every finished sample of the run by key, over ``samples.jsonl`` and the shard files (one per key)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sample_files(Path(run_dir)):
        for record in read_samples(path)[0]:
            if _prefer(out.get(record["key"]), record):
                out[record["key"]] = record
    return out


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


class SampleWriter:
    """Appends records to a sample file (repaired first): each batch written, flushed and fsync'ed at once."""

    def __init__(self, path: Path) -> None:
        repair(path)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records`` and make them durable before returning."""
        for record in records:
            self._fh.write(_json_line(record))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def merge_samples(run_dir: Path, order: Iterable[str]) -> list[dict[str, Any]]:
    """Merge ``samples.jsonl`` and every ``samples.rank{k}.jsonl`` into ``samples.jsonl``.

    One record per key, in the canonical ``order`` of the keys (records of other keys, if any, are kept after
    them); the file is replaced atomically and the shard files are removed afterwards. Returns the records.
    Calling it again is harmless.
    """
    run_dir = Path(run_dir)
    files = sample_files(run_dir)
    by_key = load_records(run_dir)
    keys = [k for k in order if k in by_key]
    known = set(keys)
    keys += [k for k in by_key if k not in known]
    records = [by_key[k] for k in keys]
    target = run_dir / SAMPLES_FILE
    current, complete = read_samples(target) if target.is_file() else (None, 0)
    shards = [p for p in files if p != target]
    if current != records or shards or (target.is_file() and complete != target.stat().st_size):
        tmp = run_dir / f".{SAMPLES_FILE}.tmp-{os.getpid()}"
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(_json_line(record))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        for shard in shards:
            shard.unlink()
    return records
