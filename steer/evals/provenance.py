"""Where a run's numbers come from: software versions, the source commit, the model's files, the decoding.

:func:`environment` (versions, Python, platform, the git commit of a source checkout) and :func:`model_record`
(the model's name, where its files are, their revision and a sha256 of the weights) are recorded once, when a
run loads its model (``settings.json``, ``resolved.provenance``); :func:`provenance` assembles the
``provenance`` block of ``metrics.json`` and ``report.md`` from them and the run's settings.

Weights hashes: a file in the Hugging Face cache is a link to a blob named by its sha256 (free); any other
weight file is read once and its sha256 kept in ``<zoo cache>/weights-sha256.json`` keyed by path, size and
modification time, so a resumed or repeated run does not read the weights again. The model's hash is the
sha256 of the sorted ``name sha256`` lines of its weight files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "environment",
    "file_sha256",
    "generation_record",
    "git_state",
    "model_record",
    "provenance",
    "weights_hash",
]

_PACKAGES = ("torch", "transformers", "diffusers", "accelerate", "numpy", "tokenizers", "huggingface_hub")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_DECODING = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "num_beams",
    "temperature",
    "top_p",
    "top_k",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
    "num_return_sequences",
    "eos_token_id",
    "pad_token_id",
)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout steer runs from (``None`` for an installed package or
    when git is not available)."""
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip()), "path": str(root)}


def environment() -> dict[str, Any]:
    """steer and library versions, Python, platform and the source checkout's commit (when there is one)."""
    import steer

    return {
        "steer": getattr(steer, "__version__", None),
        **{name: _version(name) for name in _PACKAGES},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git": git_state(),
    }


def _hash_cache_path() -> Path:
    from steer.zoo.tiny import cache_root

    return cache_root() / "weights-sha256.json"


def file_sha256(path: Path, *, progress: bool = False) -> tuple[str, str]:
    """``(sha256, how)`` of one file: ``"hub-blob"`` (the name of the Hugging Face cache blob it links to),
    ``"cached"`` (computed before for the same path, size and mtime) or ``"read"`` (computed now)."""
    path = Path(path)
    target = path.resolve()
    if path.is_symlink() and _SHA256.match(target.name):
        return target.name, "hub-blob"
    stat = target.stat()
    key = f"{target}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key], "cached"
    digest = hashlib.sha256()
    bar = None
    if progress and stat.st_size > 256 * 2**20:
        from tqdm.auto import tqdm

        bar = tqdm(total=stat.st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", file=sys.stderr)
    with target.open("rb") as fh:
        while chunk := fh.read(8 * 2**20):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    value = digest.hexdigest()
    try:
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = value
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return value, "read"


def weights_hash(folder: Path, *, progress: bool = False) -> dict[str, Any] | None:
    """``{"sha256", "files": {name: sha256}, "how": [...]}`` of the weight files in ``folder`` (``None`` when
    it holds none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES) and p.is_file())
    if not files:
        return None
    hashes: dict[str, str] = {}
    how: set[str] = set()
    for path in files:
        hashes[path.name], method = file_sha256(path, progress=progress)
        how.add(method)
    combined = hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()
    return {"sha256": combined, "files": hashes, "how": sorted(how)}


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a repo id, or no cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_record(model: Any, name: str, source: str, *, progress: bool = True) -> dict[str, Any]:
    """The loaded ``model``'s identity: ``name`` (folder or hub id), ``source``, the folder its files came from,
    the hub revision (commit) when loaded from the hub, and the weights hash."""
    config = getattr(model, "config", None)
    revision = getattr(config, "_commit_hash", None)
    folder: Path | None = None
    path = Path(name).expanduser()
    loaded_from = Path(str(getattr(model, "name_or_path", "") or "-"))
    if path.is_dir():
        folder = path.resolve()
    elif loaded_from.is_dir():  # builtin:demo and other aliases of a folder
        folder = loaded_from.resolve()
    else:
        folder = _hub_snapshot(name, revision)
        if folder is not None and revision is None and _COMMIT.match(folder.name):
            revision = folder.name
    return {
        "name": name,
        "source": source,
        "path": str(folder) if folder is not None else None,
        "revision": revision,
        "weights": weights_hash(folder, progress=progress) if folder is not None else None,
        "class": type(model).__name__,
    }


def generation_record(model: Any, kwargs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Every decoding setting ``model.generate`` runs with: the model's generation config updated with the
    run's keyword arguments (``effective``), what the run passed (``kwargs``) and the seed."""
    import copy

    effective: dict[str, Any] = {}
    config = getattr(model, "generation_config", None)
    if config is not None:
        merged = copy.deepcopy(config)
        merged.update(**dict(kwargs))
        values = merged.to_dict()
        effective = {k: values.get(k) for k in _DECODING if k in values}
    else:
        effective = dict(kwargs)
    return {"kwargs": dict(kwargs), "effective": json.loads(json.dumps(effective, default=str)), "seed": seed}


def provenance(
    settings: Mapping[str, Any], resolved: Mapping[str, Any], *, generation: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``provenance`` block of ``metrics.json``: environment and model as recorded when the run loaded its
    model (else as found now, marked ``recorded: "at scoring"``), device and dtype, seed, every generation
    setting and the methods' resolved parameters."""
    recorded = resolved.get("provenance") or {}
    env = recorded.get("environment")
    when = "at generation"
    if env is None:
        env, when = environment(), "at scoring"
    model = recorded.get("model") or {"name": settings.get("model"), "source": resolved.get("source")}
    return {
        "recorded": when,
        "versions": {k: v for k, v in env.items() if k not in ("git", "python", "platform")},
        "python": env.get("python"),
        "platform": env.get("platform"),
        "git": env.get("git"),
        "device": resolved.get("device"),
        "dtype": resolved.get("dtype"),
        "device_map": resolved.get("device_map", settings.get("device_map")),
        "quantization": resolved.get("quantization", settings.get("quantization")),
        "attn_implementation": resolved.get("attn_implementation"),
        "model": model,
        "seed": settings.get("seed", 0),
        "generation": dict(generation or recorded.get("generation") or {}),
        "template": resolved.get("template"),
        "prompt": settings.get("prompt"),
        "methods": settings.get("methods") or [],
        "recipe": resolved.get("recipe", settings.get("recipe")),
        "method_params": resolved.get("params") or {},
    }
