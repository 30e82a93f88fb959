"""Inputs in the ecosystem's formats: Hugging Face ``datasets`` datasets for ``--images`` and ``--questions``.

A dataset is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
``datasets.load_from_disk``; ``pip install 'steer-toolkit[data]'``), a ``.parquet`` file, or a folder of
``.parquet`` files (read with pyarrow, which ``datasets`` brings). The runner reads files, so a dataset is
turned into them once and kept in the zoo cache (``$STEER_ZOO_DIR/inputs/<fingerprint>/``, default
``~/.cache/steer/zoo``), keyed by the dataset's files (names, sizes, modification times):

* :func:`extract_images`: every distinct image of the dataset's image column (``datasets.Image``, or a struct of
  ``bytes``/``path``) as a file named by its image id: the row's file name when it has one that names the id
  (``file_name``, ``image_source``, ... or the image's own path), else ``<id>.<ext>``. The id comes from an id
  column (``image_id``, ``id``, ``cocoid``, ...) or from that name. Encoded bytes are written as they are.
* :func:`pope_question_files`: POPE questions (``question``/``text``, ``answer``/``label``, the image's name or
  the image itself, optionally ``question_id`` and a ``category``/``split`` column such as lmms-lab/POPE's)
  as one POPE question file per split.

For CHAIR the ground truth can be a COCO ``instances_*.json`` given directly (`steer.evals.chair.load_gt`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals.chair import parse_image_id

__all__ = [
    "dataset_columns",
    "extract_images",
    "has_image_column",
    "is_dataset",
    "pope_question_files",
]

ID_COLUMNS = ("image_id", "cocoid", "coco_id", "imgid", "id")
NAME_COLUMNS = ("file_name", "image_source", "image_file", "filename", "image_name", "image_path", "image")
QUESTION_COLUMNS = ("text", "question")
LABEL_COLUMNS = ("label", "answer")
QID_COLUMNS = ("question_id", "qid")
SPLIT_COLUMNS = ("category", "split", "type", "subset")
_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if path.is_dir():
        return sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet"))
    return []


def _saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def is_dataset(path: str | Path | None) -> bool:
    """True for a ``save_to_disk`` folder, a ``.parquet`` file or a folder of parquet files."""
    if path is None:
        return False
    path = Path(path)
    return _saved_dataset(path) or bool(_parquet_files(path))


def _fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        stat = f.stat()
        digest.update(
            f"{f.relative_to(path) if f != path else f.name}|{stat.st_size}|{stat.st_mtime_ns}".encode()
        )
    return digest.hexdigest()[:16]


def _cache(path: Path) -> Path:
    from steer.zoo.tiny import cache_root

    return cache_root() / "inputs" / _fingerprint(path)


def _need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise EvalInputError(
            f"reading a Hugging Face dataset needs the {module} package: pip install 'steer-toolkit[data]'"
        ) from None


def _load_saved(path: Path) -> Any:
    """The dataset of a ``save_to_disk`` folder (a ``DatasetDict``: its ``test``, ``validation``, ``val`` or
    ``train`` part, or its only one), image columns left encoded."""
    datasets = _need("datasets")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged or foreign folder
        raise EvalInputError(
            f"{path}: not a readable datasets folder ({type(err).__name__}: {err})"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        pick = next(
            (n for n in ("test", "validation", "val", "train") if n in names),
            names[0] if len(names) == 1 else None,
        )
        if pick is None:
            raise EvalInputError(
                f"{path}: a DatasetDict with parts {', '.join(names)}; save the part to use alone"
            )
        data = data[pick]
    for name, feature in data.features.items():
        if isinstance(feature, datasets.Image):
            data = data.cast_column(name, datasets.Image(decode=False))
    return data


def _rows(path: Path) -> tuple[list[str], int, Iterator[dict[str, Any]]]:
    """``(columns, number of rows, rows)`` of a dataset; image cells are ``{"bytes", "path"}`` dicts."""
    path = Path(path)
    if _saved_dataset(path):
        data = _load_saved(path)
        return list(data.column_names), len(data), iter(data)
    files = _parquet_files(path)
    if not files:
        raise EvalInputError(
            f"{path}: not a dataset (a save_to_disk folder, a .parquet file or a folder of them)"
        )
    _need("pyarrow")
    import pyarrow.parquet as pq

    try:
        tables = [pq.ParquetFile(f) for f in files]
    except Exception as err:
        raise EvalInputError(f"{path}: unreadable parquet ({type(err).__name__}: {err})") from None
    columns = list(tables[0].schema_arrow.names)
    total = sum(t.metadata.num_rows for t in tables)

    def rows() -> Iterator[dict[str, Any]]:
        for table in tables:
            for batch in table.iter_batches(batch_size=256):
                yield from batch.to_pylist()

    return columns, total, rows()


def dataset_columns(path: str | Path) -> list[str]:
    """The column names of a dataset."""
    return _rows(Path(path))[0]


def _is_image(value: Any) -> bool:
    return isinstance(value, Mapping) and "bytes" in value and "path" in value


def _image_column(path: Path) -> str | None:
    columns, _, rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise EvalInputError(f"{path}: the dataset has no rows")
    return next((c for c in columns if _is_image(first.get(c))), None)


def has_image_column(path: str | Path) -> bool:
    """True when the dataset holds the images themselves."""
    return is_dataset(path) and _image_column(Path(path)) is not None


def _first(row: Mapping[str, Any], names: Sequence[str], skip: str | None = None) -> Any:
    for name in names:
        if name != skip and name in row and row[name] not in (None, ""):
            return row[name]
    return None


def _suffix(data: bytes) -> str:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ""


def _name_and_id(row: Mapping[str, Any], image_column: str | None, where: str) -> tuple[str, int, str | None]:
    """``(stem or file name, image id, suffix given by the name or None)`` of a row's image."""
    names = [v for v in (_first(row, NAME_COLUMNS, skip=image_column),) if isinstance(v, str)]
    if image_column is not None and _is_image(row.get(image_column)) and row[image_column].get("path"):
        names.append(str(row[image_column]["path"]))
    raw_id = _first(row, ID_COLUMNS)
    image_id = None
    if raw_id is not None:
        try:
            image_id = parse_image_id(raw_id if not isinstance(raw_id, float) else int(raw_id))
        except EvalInputError:
            image_id = None
    for name in names:
        base = Path(name).name
        try:
            found = parse_image_id(base)
        except EvalInputError:
            continue
        if image_id is None or found == image_id:
            suffix = Path(base).suffix.lower()
            return base, found, suffix if suffix in _SUFFIXES else None
    if image_id is None:
        raise EvalInputError(
            f"{where}: cannot tell the image id (give a column {' or '.join(ID_COLUMNS[:2])}, or a file name "
            f"column such as {', '.join(NAME_COLUMNS[:2])} whose names end in the id)"
        )
    return str(image_id), image_id, None


def _image_bytes(cell: Mapping[str, Any], where: str) -> tuple[bytes, str]:
    data = cell.get("bytes")
    if data is None and cell.get("path") and Path(cell["path"]).is_file():
        data = Path(cell["path"]).read_bytes()
    if not data:
        raise EvalInputError(f"{where}: the image has neither bytes nor a readable path")
    suffix = _suffix(data)
    if not suffix:  # an encoding PIL reads but the runner's file suffixes do not name: store as PNG
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
        data, suffix = buffer.getvalue(), ".png"
    return data, suffix


def _file_name(stem: str, given: str | None, suffix: str) -> str:
    """The file name of an image: the given name, with the suffix of the bytes' format when it names another."""
    if given is not None and given.replace(".jpeg", ".jpg") == suffix:
        return stem
    return Path(stem).stem + suffix if Path(stem).suffix.lower() in _SUFFIXES else stem + suffix


def _publish(tmp: Path, target: Path) -> None:
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def extract_images(path: str | Path, *, progress: bool = True) -> Path:
    """The folder of the dataset's images, written once into the zoo cache (see the module docstring)."""
    path = Path(path)
    image_column = _image_column(path)
    if image_column is None:
        raise EvalInputError(
            f"{path}: the dataset has no image column (a datasets.Image feature or a struct of bytes/path); "
            "--images takes a folder of images or a dataset that holds them"
        )
    target = _cache(path) / "images"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".images-", dir=target.parent))
    try:
        _, total, rows = _rows(path)
        from tqdm.auto import tqdm

        seen: dict[int, str] = {}
        for i, row in enumerate(
            tqdm(
                rows,
                total=total,
                desc="images from the dataset",
                unit="row",
                file=sys.stderr,
                disable=not progress,
            )
        ):
            stem, image_id, given = _name_and_id(row, image_column, f"{path}: row {i}")
            if image_id in seen:
                continue
            data, suffix = _image_bytes(row[image_column], f"{path}: row {i}")
            name = _file_name(stem, given, suffix)
            (tmp / name).write_bytes(data)
            seen[image_id] = name
        (tmp / ".complete").write_text(json.dumps({"source": str(path), "images": len(seen)}) + "\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _label(value: Any, where: str) -> str:
    text = str(value).strip().lower().rstrip(".")
    if text not in ("yes", "no"):
        raise EvalInputError(f"{where}: the answer/label must be yes or no, got {value!r}")
    return text


def pope_question_files(path: str | Path, splits: Sequence[str]) -> dict[str, Path]:
    """One POPE question file (JSON lines, the RUCAIBox format) per split in ``splits`` from a dataset of
    questions; a dataset without a split column gives its questions to a single split."""
    path = Path(path)
    columns, _, rows = _rows(path)
    missing = [
        what
        for what, names in (("question", QUESTION_COLUMNS), ("answer/label", LABEL_COLUMNS))
        if not set(names) & set(columns)
    ]
    if missing:
        raise EvalInputError(
            f"{path}: no {' and no '.join(missing)} column (columns: {', '.join(columns)}); a POPE dataset has "
            "question/text, answer/label and the image or its file name"
        )
    split_column = next((c for c in SPLIT_COLUMNS if c in columns), None)
    if split_column is None and len(splits) > 1:
        raise EvalInputError(
            f"{path}: the dataset has no split column ({', '.join(SPLIT_COLUMNS)}); use one --split"
        )
    image_column = _image_column(path)
    per: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    for i, row in enumerate(rows):
        split = str(row[split_column]).strip().lower() if split_column else splits[0]
        if split not in per:
            continue
        where = f"{path}: row {i}"
        stem, _, given = _name_and_id(row, image_column, where)
        if image_column is not None:  # the name extract_images gives this row's image
            stem = _file_name(stem, given, _image_bytes(row[image_column], where)[1])
        qid = _first(row, QID_COLUMNS)
        per[split].append(
            {
                "question_id": int(qid)
                if isinstance(qid, (int, str)) and str(qid).strip().isdigit()
                else None,
                "image": stem,
                "text": str(_first(row, QUESTION_COLUMNS)),
                "label": _label(_first(row, LABEL_COLUMNS), where),
            }
        )
    out: dict[str, Path] = {}
    folder = _cache(path)
    folder.mkdir(parents=True, exist_ok=True)
    for split, questions in per.items():
        if not questions:
            found = f" (its {split_column} values do not include {split!r})" if split_column else ""
            raise EvalInputError(f"{path}: no questions for split {split!r}{found}")
        ids = [q["question_id"] for q in questions]
        if None in ids or len(set(ids)) != len(ids):
            for n, q in enumerate(questions, 1):
                q["question_id"] = n
        target = folder / f"pope_{split}.jsonl"
        text = "".join(json.dumps(q) + "\n" for q in questions)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        out[split] = target
    return out
