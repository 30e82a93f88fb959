"""Generation + scoring in one run: ``steer eval chair|pope``.

A run lives in one folder (``RUN_DIR``):

* ``settings.json``: the run's settings and their stable hash (:class:`EvalSettings`), written before anything is
  generated. A later invocation with the same ``--out`` resumes only when the hash is the same; otherwise it is
  refused with the list of settings that differ.
* ``samples.jsonl``: one JSON line per finished sample, appended (flushed and fsync'ed) as soon as its batch is
  done, so a crash or Ctrl-C loses at most the batch in flight. Re-running resumes: samples already on disk are
  skipped. A half-written last line (a crash mid-write) is cut off on resume. An unreadable image gives a
  record with an ``error`` field (and no answer) and the run goes on; ``--retry-errors`` redoes those.
* Under ``accelerate launch`` (``WORLD_SIZE > 1``) process ``k`` of ``n`` takes the samples at positions
  ``k, k + n, ...`` of the canonical sample list and appends to ``samples.rank{k}.jsonl``; after a barrier,
  process 0 merges every sample file into ``samples.jsonl`` (canonical order, one record per sample), removes
  the shard files, and scores. The merged file is the same as a single-process run's.
* ``metrics.json`` and ``report.md``: written by :mod:`steer.evals.report` after scoring.

Nothing is timed or randomised inside a sample record, so records of equal generations are byte-identical
whichever way (batch size, number of processes, interruptions) they were produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from steer.evals import chair, pope
from steer.evals.chair import EvalInputError

__all__ = [
    "CHAIR_PROMPT",
    "ChairTask",
    "EvalSettings",
    "GenerationStats",
    "LLAVA_V1_SYSTEM",
    "POPE_PROMPTS",
    "PopeTask",
    "Sample",
    "SettingsMismatchError",
    "TEMPLATES",
    "build_prompt",
    "chair_task",
    "check_settings",
    "finish_run",
    "generate_shard",
    "merge_samples",
    "pope_task",
    "read_samples",
    "run_eval",
]

CHAIR_PROMPT = "Please describe this image in detail."
"""The CHAIR user text of OPERA/VISTA/CCA (spec ``chair.md``, generation protocol)."""

POPE_PROMPTS: dict[str, str] = {
    "llava": "{question}\nAnswer the question using a single word or phrase.",
    "vcd": "{question} Please answer this question with one word.",
    "raw": "{question}",
}
"""POPE user texts by name (spec ``pope.md``, prompts and decoding)."""

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""The system line of LLaVA's ``vicuna_v1`` conversation (template ``llava_v1``)."""

TEMPLATES = ("auto", "llava_v1", "chat", "plain")
"""Prompt templates: ``llava_v1`` = ``"{system} USER: <image>\\n{text} ASSISTANT:"`` (LLaVA-1.5 only);
``chat`` = the processor's chat template (image first, then the text); ``plain`` = ``steer.zoo.chat_prompt``;
``auto`` = ``llava_v1`` for LLaVA-1.5, else ``chat`` when the processor has a chat template, else ``plain``."""

POPE_VERSIONS = ("2023-08", "current")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "settings.json"


class SettingsMismatchError(EvalInputError):
    """``RUN_DIR`` already holds a run whose settings differ from the ones asked for."""


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


@dataclass
class EvalSettings:
    """Everything that determines a run's generations; :meth:`stable_hash` guards resuming.

    Fields in ``NOT_HASHED`` (batch size, device map, the images folder) are recorded but may change between
    invocations of one run: they decide how and where samples are produced, not which.
    """

    task: str
    model: str
    methods: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    attn_implementation: str | None = None
    template: str = "auto"
    prompt: str = ""
    max_new_tokens: int = 512
    num_beams: int = 1
    do_sample: bool = False
    selection: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    device_map: str | None = None
    images: str = ""

    NOT_HASHED: ClassVar[tuple[str, ...]] = ("batch_size", "device_map", "images")

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values."""
        return json.loads(_canonical_json(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The hashed fields."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_HASHED}

    def stable_hash(self) -> str:
        """sha256 (16 hex digits) of the canonical JSON of :meth:`identity`; stable across processes and runs."""
        return hashlib.sha256(_canonical_json(self.identity()).encode("utf-8")).hexdigest()[:16]

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` (greedy unless ``num_beams > 1``)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
        }

    @property
    def method_label(self) -> str:
        """``recipe + methods`` for tables, ``baseline`` when nothing is applied."""
        parts = ([f"recipe:{self.recipe}"] if self.recipe else []) + list(self.methods)
        return "+".join(parts) or "baseline"


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return lines


def read_settings(run_dir: Path) -> dict[str, Any] | None:
    """The content of ``RUN_DIR/settings.json``, or ``None`` when there is none."""
    path = Path(run_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EvalInputError(
            f"{path}: unreadable settings file ({err}); remove it or choose another --out"
        ) from None
    if not isinstance(data, dict) or "hash" not in data or "settings" not in data:
        raise EvalInputError(f"{path}: not a steer eval settings file; choose another --out")
    return data


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_settings(run_dir: Path, settings: EvalSettings, *, write: bool = True) -> bool:
    """Make sure ``run_dir`` holds this run (or nothing yet); return True when it resumes an earlier invocation.

    Writes ``settings.json`` for a new run when ``write`` (process 0 only under ``accelerate launch``).

    Raises:
        SettingsMismatchError: the folder holds a run with a different settings hash (the message lists the
            differing settings), or samples without a ``settings.json``.
    """
    run_dir = Path(run_dir)
    existing = read_settings(run_dir)
    digest = settings.stable_hash()
    if existing is None:
        if _sample_files(run_dir):
            raise SettingsMismatchError(
                f"{run_dir} holds samples but no {SETTINGS_FILE}, so it cannot be resumed safely; "
                "choose another --out or remove the folder"
            )
        if write:
            run_dir.mkdir(parents=True, exist_ok=True)
            payload = {"hash": digest, "settings": settings.to_dict(), "resolved": {}, "created": time.time()}
            _write_json_atomic(run_dir / SETTINGS_FILE, payload)
        return False
    if existing["hash"] != digest and not any(read_samples(f)[0] for f in _sample_files(run_dir)):
        # nothing was generated under the old settings (e.g. the model failed to load): start afresh
        if write:
            for stale in ("metrics.json", "report.md"):
                (run_dir / stale).unlink(missing_ok=True)
            payload = {"hash": digest, "settings": settings.to_dict(), "resolved": {}, "created": time.time()}
            _write_json_atomic(run_dir / SETTINGS_FILE, payload)
        return False
    if existing["hash"] != digest:
        old = {k: v for k, v in existing["settings"].items() if k not in EvalSettings.NOT_HASHED}
        diff = _differences(old, settings.identity()) or ["(the settings format changed)"]
        raise SettingsMismatchError(
            f"{run_dir} holds a run with different settings (hash {existing['hash']} != {digest}); "
            "resuming would mix them. Differences:\n  "
            + "\n  ".join(diff)
            + "\nUse the same command to resume, or another --out for a new run."
        )
    return True


def record_resolved(run_dir: Path, resolved: Mapping[str, Any]) -> None:
    """Store what loading revealed (family, template string, the methods' resolved parameters) once."""
    path = Path(run_dir) / SETTINGS_FILE
    data = read_settings(run_dir)
    if data is None or data.get("resolved"):
        return
    data["resolved"] = dict(resolved)
    _write_json_atomic(path, data)


# --------------------------------------------------------------------------------------------------
# Samples and tasks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generation to run: ``key`` is unique in the run; ``text`` the user text (caption prompt or POPE
    question); ``fields`` are copied into the record."""

    key: str
    image_path: Path
    text: str
    fields: Mapping[str, Any]


def _list_images(images_dir: Path) -> dict[int, Path]:
    """``{image_id: path}`` for every image file in ``images_dir`` whose name ends in a number."""
    if not images_dir.is_dir():
        raise EvalInputError(f"--images: folder not found: {images_dir}")
    out: dict[int, Path] = {}
    clashes = []
    for entry in os.scandir(images_dir):
        name = entry.name
        if not entry.is_file() or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        try:
            image_id = chair.parse_image_id(name)
        except EvalInputError:
            continue
        if image_id in out:
            clashes.append(name)
        out[image_id] = Path(entry.path)
    if clashes:
        raise EvalInputError(
            f"{images_dir}: several files for one image id: {', '.join(sorted(clashes)[:5])}"
        )
    return out


def _data_candidates(*parts: str) -> list[Path]:
    """Where shipped/reference data may be: the package, a source checkout's tests/data, ../shared/data."""
    here = Path(__file__).resolve().parent
    root = here.parent.parent
    return [
        here.joinpath("data", *parts[1:]),
        here.joinpath("data", *parts),
        root.joinpath("tests", "data", *parts[1:]),
        root.parent.joinpath("shared", "data", *parts),
    ]


def opera500_ids() -> list[int] | None:
    """The OPERA/VISTA/CCA 500 COCO val2014 CHAIR image ids, when a copy of the list can be found."""
    for path in _data_candidates("chair", "opera500_image_ids.txt"):
        if path.is_file():
            return [int(line) for line in path.read_text().split() if line.strip()]
    return None


def _md5_lines(values: Iterable[Any]) -> str:
    return hashlib.md5("\n".join(map(str, values)).encode("utf-8")).hexdigest()


class _Task:
    """What both tasks share: the JSON line of a finished sample, with the model output under ``answer_field``."""

    answer_field = "answer"

    def record(
        self, sample: Sample, answer: str | None, n_tokens: int | None, error: str | None
    ) -> dict[str, Any]:
        out = {"key": sample.key, **sample.fields, self.answer_field: answer}
        if error is None:
            out["n_generated_tokens"] = n_tokens
        else:
            out["error"] = error
        return out


class ChairTask(_Task):
    """CHAIR: caption every selected image with one prompt, score the captions against COCO ground truth."""

    name = "chair"
    answer_field = "caption"

    def __init__(
        self,
        samples: list[Sample],
        selection: dict[str, Any],
        gt: chair.GroundTruth,
        *,
        lineage: str = "original",
        truncate_incomplete: bool = False,
        vocabulary: chair.Vocabulary | None = None,
    ) -> None:
        self.samples = samples
        self.selection = selection
        self.gt = gt
        self.lineage = lineage
        self.truncate_incomplete = truncate_incomplete
        self.vocabulary = vocabulary

    def score(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``{"metrics": {CHAIRs, CHAIRi, Recall, Len, Precision, F1} in percent, "details", "scored"}``."""
        captions = [
            {"image_id": r["image_id"], "caption": r["caption"]} for r in records if not r.get("error")
        ]
        if not captions:
            raise EvalInputError("no caption could be generated (every sample is an error); nothing to score")
        result = chair.score_captions(
            captions,
            self.gt,
            vocabulary=self.vocabulary,
            lineage=self.lineage,
            truncate_incomplete=self.truncate_incomplete,
        )
        overall = result["overall"]
        metrics = {
            "CHAIRs": round(100 * overall["CHAIR_s"], 1),
            "CHAIRi": round(100 * overall["CHAIR_i"], 1),
            "Recall": round(100 * overall["Recall"], 1),
            "Len": round(overall["Len"], 1),
            "Precision": round(100 * overall["Precision"], 1),
            "F1": round(100 * overall["F1"], 1),
        }
        return {
            "metrics": metrics,
            "details": {"config": result["config"], "overall": overall},
            "scored": result["captions"],
        }


def chair_task(
    images_dir: Path,
    *,
    num_images: int = 500,
    image_ids: Path | None = None,
    gt_objects: Path | None = None,
    prompt: str = CHAIR_PROMPT,
    lineage: str = "original",
    truncate_incomplete: bool = False,
    synonyms: Path | None = None,
) -> ChairTask:
    """Select the CHAIR images and build the task.

    ``synonyms`` is a CHAIR synonym table other than the shipped COCO one (e.g. the built-in benchmark's).

    Selection: the ids of ``image_ids`` (one per line) when given; else the OPERA-500 list when every one of its
    images is in ``images_dir``; else the image files sorted by id. The first ``num_images`` are kept. Image ids
    missing from the ground truth are an error (before anything is generated).
    """
    images_dir = Path(images_dir)
    if num_images < 1:
        raise EvalInputError(f"--num-images must be >= 1, got {num_images}")
    if lineage not in chair.LINEAGES:
        raise EvalInputError(f"unknown --lineage {lineage!r}; expected one of {', '.join(chair.LINEAGES)}")
    available = _list_images(images_dir)
    if image_ids is not None:
        try:
            wanted = [chair.parse_image_id(t) for t in Path(image_ids).read_text().split()]
        except OSError as err:
            raise EvalInputError(f"--image-ids: cannot read {image_ids} ({err.strerror or err})") from None
        source = f"file:{Path(image_ids).name}"
        missing = [i for i in wanted[:num_images] if i not in available]
        if missing:
            raise EvalInputError(
                f"{len(missing)} images of {image_ids} are not in {images_dir}: "
                + ", ".join(map(str, missing[:5]))
                + (" ..." if len(missing) > 5 else "")
            )
    else:
        opera = opera500_ids()
        if opera and all(i in available for i in opera):
            wanted, source = opera, "opera500"
        else:
            wanted, source = sorted(available), "sorted"
    ids = wanted[:num_images]
    if not ids:
        raise EvalInputError(f"{images_dir}: no images named like COCO files (COCO_val2014_000000123456.jpg)")
    gt = chair.load_gt(gt_objects)
    vocabulary = chair.load_vocabulary(synonyms) if synonyms is not None else None
    absent = [i for i in ids if i not in gt.objects]
    if absent:
        raise EvalInputError(
            f"{len(absent)} image ids are not in the CHAIR ground truth ({gt.source}): "
            + ", ".join(map(str, absent[:5]))
            + (" ..." if len(absent) > 5 else "")
        )
    samples = [
        Sample(
            key=str(i),
            image_path=available[i],
            text=prompt,
            fields={"image_id": i, "image": available[i].name},
        )
        for i in ids
    ]
    selection = {
        "source": source,
        "num_images": num_images,
        "n": len(ids),
        "image_ids_md5": _md5_lines(ids),
        "gt_md5": gt.md5,
    }
    if vocabulary is not None:
        selection["synonyms_md5"] = vocabulary.md5
    return ChairTask(
        samples,
        selection,
        gt,
        lineage=lineage,
        truncate_incomplete=truncate_incomplete,
        vocabulary=vocabulary,
    )


class PopeTask(_Task):
    """POPE: ask every selected question about its image, score the answers per split (steer's POPE answer
    format plus ``key``)."""

    name = "pope"
    answer_field = "answer"

    def __init__(
        self,
        samples: list[Sample],
        selection: dict[str, Any],
        questions: dict[str, pope.QuestionSet],
        *,
        parser: str = "official",
    ) -> None:
        self.samples = samples
        self.selection = selection
        self.questions = questions
        self.parser = parser

    def score(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Per split: accuracy, precision, recall, F1, yes-ratio, off-format rate (percent); errors are left out
        of the metrics and counted as ``missing``."""
        splits: dict[str, Any] = {}
        scored: list[dict[str, Any]] = []
        for split, qset in self.questions.items():
            answers = [
                pope.Answer(
                    question_id=int(r["question_id"]),
                    answer=str(r["answer"]).strip(),
                    text=r.get("text"),
                    image=r.get("image"),
                    label=r.get("label"),
                    questions_md5=r.get("questions_md5"),
                )
                for r in records
                if r.get("split") == split and not r.get("error")
            ]
            if not answers:
                raise EvalInputError(f"POPE {split}: no answer could be generated (every sample is an error)")
            result = pope.score_answers(answers, qset, parser=self.parser, allow_missing=True)
            splits[split] = result["metrics"]
            scored.extend({"split": split, **rec} for rec in result["records"])
        summary = pope.summarize_splits(splits)
        names = {
            "accuracy": "Accuracy",
            "precision": "Precision",
            "recall": "Recall",
            "f1": "F1",
            "yes_ratio": "Yes-ratio",
            "off_format_rate": "Off-format",
        }
        metrics: dict[str, float] = {}
        if len(splits) == 1:
            (only,) = splits.values()
            metrics = {label: round(100 * only[key], 2) for key, label in names.items()}
        else:
            metrics["F1 (mean)"] = round(100 * summary["mean"]["f1"], 2)
            metrics["Accuracy (mean)"] = round(100 * summary["mean"]["accuracy"], 2)
            for split, row in splits.items():
                for key, label in names.items():
                    metrics[f"{label} ({split})"] = round(100 * row[key], 2)
        details = {
            "config": {
                "parser": self.parser,
                "questions": {
                    s: {"source": q.source, "md5": q.md5, "version": q.version}
                    for s, q in self.questions.items()
                },
            },
            "splits": splits,
            **summary,
        }
        return {"metrics": metrics, "details": details, "scored": scored}


def _find_questions(split: str, version: str, questions_dir: Path | None) -> Path:
    names = [f"coco_pope_{split}_2023-08.json"] if version == "2023-08" else [f"coco_pope_{split}.json"]
    names += [n + ".gz" for n in names]
    dirs: list[Path] = []
    if questions_dir is not None:
        dirs.append(Path(questions_dir))
    elif os.environ.get("STEER_POPE_DIR"):
        dirs.append(Path(os.environ["STEER_POPE_DIR"]))
    else:
        dirs.extend(dict.fromkeys(p.parent for p in _data_candidates("pope", "x")))
    for folder in dirs:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise EvalInputError(
        f"no POPE question file {names[0]} found in {', '.join(map(str, dirs))}; pass --questions FILE or "
        "--questions-dir DIR (the RUCAIBox/POPE COCO files), or set STEER_POPE_DIR"
    )


def pope_task(
    images_dir: Path,
    *,
    splits: Sequence[str] = ("random",),
    questions: Path | None = None,
    questions_dir: Path | None = None,
    version: str = "2023-08",
    num_images: int = 500,
    prompt: str = "llava",
    parser: str = "official",
    question_files: Mapping[str, Path] | None = None,
) -> PopeTask:
    """Load the question files of ``splits`` and build the task.

    ``question_files`` maps each split to its file (the built-in benchmark); else ``questions`` (one split only)
    overrides the lookup of ``coco_pope_{split}[_2023-08].json`` in
    ``questions_dir`` / ``$STEER_POPE_DIR`` / the package data / a checkout's ``../shared/data/pope``.
    ``num_images`` keeps the questions of the first N distinct images in the first split's file order (all
    three POPE splits use the same 500 images). Missing images are an error listing the first few.
    """
    images_dir = Path(images_dir)
    splits = list(dict.fromkeys(splits))
    bad = [s for s in splits if s not in pope.SPLITS]
    if bad or not splits:
        raise EvalInputError(
            f"unknown --split {', '.join(bad)!r}; expected random, popular, adversarial or all"
        )
    if version not in POPE_VERSIONS:
        raise EvalInputError(
            f"unknown --pope-version {version!r}; expected one of {', '.join(POPE_VERSIONS)}"
        )
    if prompt not in POPE_PROMPTS:
        raise EvalInputError(f"unknown POPE --prompt {prompt!r}; expected one of {', '.join(POPE_PROMPTS)}")
    if parser not in pope.PARSERS:
        raise EvalInputError(f"unknown --parser {parser!r}; expected one of {', '.join(pope.PARSERS)}")
    if num_images < 1:
        raise EvalInputError(f"--num-images must be >= 1, got {num_images}")
    if questions is not None and len(splits) > 1:
        raise EvalInputError("--questions gives one file: use it with a single --split")
    sets: dict[str, pope.QuestionSet] = {}
    for split in splits:
        if question_files is not None:
            path = Path(question_files[split])
        elif questions is not None:
            path = Path(questions)
        else:
            path = _find_questions(split, version, questions_dir)
        sets[split] = pope.load_questions(path)
    first = next(iter(sets.values()))
    chosen: list[str] = []
    for qid in sorted(first.questions):
        image = first.questions[qid].image
        if image not in chosen:
            chosen.append(image)
    keep = set(chosen[:num_images])
    available = _list_images(images_dir)
    template = POPE_PROMPTS[prompt]
    samples: list[Sample] = []
    missing: list[str] = []
    subsets: dict[str, pope.QuestionSet] = {}
    for split, qset in sets.items():
        selected = {qid: q for qid, q in sorted(qset.questions.items()) if q.image in keep}
        subsets[split] = dataclasses.replace(qset, questions=selected)
        for qid, q in selected.items():
            path = images_dir / q.image
            if not path.is_file():
                try:
                    path = available.get(chair.parse_image_id(q.image), path)
                except EvalInputError:
                    pass
            if not path.is_file():
                missing.append(q.image)
                continue
            samples.append(
                Sample(
                    key=f"{split}/{qid}",
                    image_path=path,
                    text=template.format(question=q.text),
                    fields={
                        "split": split,
                        "question_id": qid,
                        "image": q.image,
                        "text": q.text,
                        "label": q.label,
                        "questions_md5": qset.md5,
                    },
                )
            )
    if missing:
        unique = list(dict.fromkeys(missing))
        raise EvalInputError(
            f"{len(unique)} POPE images are not in {images_dir}: {', '.join(unique[:5])}"
            + (" ..." if len(unique) > 5 else "")
        )
    selection = {
        "splits": list(sets),
        "version": {s: q.version for s, q in sets.items()},
        "questions_md5": {s: q.md5 for s, q in sets.items()},
        "num_images": num_images,
        "n_images": len(keep),
        "n": len(samples),
        "prompt_name": prompt,
    }
    return PopeTask(samples, selection, subsets, parser=parser)


Task = ChairTask | PopeTask


# --------------------------------------------------------------------------------------------------
# Prompts and generation
# --------------------------------------------------------------------------------------------------


def _has_chat_template(processor: Any) -> bool:
    return bool(getattr(processor, "chat_template", None)) and hasattr(processor, "apply_chat_template")


def resolve_template(template: str, model_type: str, processor: Any) -> str:
    """The concrete template name for ``template`` (``auto`` resolved) on this model."""
    if template not in TEMPLATES:
        raise EvalInputError(f"unknown --template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template == "auto":
        if model_type == "llava":
            return "llava_v1"
        return "chat" if _has_chat_template(processor) else "plain"
    if template == "llava_v1" and model_type != "llava":
        raise EvalInputError(f"--template llava_v1 is LLaVA-1.5's conversation; this model is {model_type}")
    if template == "chat" and not _has_chat_template(processor):
        raise EvalInputError("--template chat: the processor has no chat template; use plain")
    return template


def build_prompt(text: str, template: str, model_type: str, processor: Any) -> str:
    """The full prompt (with the image placeholder) for one user ``text`` under a resolved ``template``."""
    if template == "llava_v1":
        return f"{LLAVA_V1_SYSTEM} USER: <image>\n{text} ASSISTANT:"
    if template == "chat":
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from steer import zoo
    from steer.evals.loading import ZOO_MODEL_TYPES

    if model_type not in ZOO_MODEL_TYPES:
        raise EvalInputError(f"no plain prompt format for model type {model_type!r}; use --template chat")
    return zoo.chat_prompt(ZOO_MODEL_TYPES[model_type], text)


def _open_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _count_tokens(row: Sequence[int], stop: set[int]) -> int:
    for i, token in enumerate(row):
        if token in stop:
            return i
    return len(row)


def _generate_batch(
    loaded: Any, prompts: list[str], images: list[Any], generation: Mapping[str, Any]
) -> list[tuple[str, int]]:
    """Generate for one batch (left padding); ``[(answer, n_generated_tokens)]`` in input order.

    The answer is the decoded generation with special tokens skipped and surrounding whitespace stripped.
    """
    import torch

    model, processor = loaded.model, loaded.processor
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    pixels = inputs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.is_floating_point():
        inputs["pixel_values"] = pixels.to(model.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, **generation)
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    gen = model.generation_config
    eos = gen.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if gen.pad_token_id is not None:
        stop.add(gen.pad_token_id)
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [(text.strip(), _count_tokens(row, stop)) for text, row in zip(texts, new)]


# --------------------------------------------------------------------------------------------------
# Sample files
# --------------------------------------------------------------------------------------------------


def _sample_files(run_dir: Path) -> list[Path]:
    """``samples.jsonl`` (when present) and the shard files ``samples.rank{k}.jsonl`` in rank order."""
    run_dir = Path(run_dir)
    files = [run_dir / SAMPLES_FILE] if (run_dir / SAMPLES_FILE).is_file() else []
    shards = sorted(
        run_dir.glob("samples.rank*.jsonl"),
        key=lambda p: (
            int(p.name[len("samples.rank") : -len(".jsonl")] or 0)
            if p.name[len("samples.rank") : -len(".jsonl")].isdigit()
            else 1 << 30
        ),
    )
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


def _repair(path: Path) -> None:
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
    for path in _sample_files(Path(run_dir)):
        for record in read_samples(path)[0]:
            if _prefer(out.get(record["key"]), record):
                out[record["key"]] = record
    return out


class _Writer:
    """Appends records to a sample file: each batch written, flushed and fsync'ed at once."""

    def __init__(self, path: Path) -> None:
        _repair(path)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """What one process did in one invocation."""

    rank: int
    world_size: int
    assigned: int
    already_done: int
    generated: int
    errors: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return (self.generated + self.errors) / self.seconds if self.seconds > 0 else 0.0


def _chunks(items: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="sample",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def shard_path(run_dir: Path, rank: int, world_size: int) -> Path:
    """Where process ``rank`` appends: ``samples.jsonl`` alone, ``samples.rank{k}.jsonl`` when sharded."""
    return Path(run_dir) / (SAMPLES_FILE if world_size <= 1 else f"samples.rank{rank}.jsonl")


def generate_shard(
    task: Task,
    settings: EvalSettings,
    run_dir: Path,
    load: Callable[[], Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    retry_errors: bool = False,
    progress: bool = True,
) -> GenerationStats:
    """Generate this process's share of the samples that are not on disk yet, appending each batch at once.

    Process ``rank`` of ``world_size`` owns the samples at positions ``rank, rank + world_size, ...`` of
    ``task.samples``. ``load()`` is called only when there is something to generate; it returns the loaded
    model (with steer methods applied) and a resolved template name as ``(loaded, template)``.
    """
    run_dir = Path(run_dir)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    done = load_records(run_dir)
    mine = [s for i, s in enumerate(task.samples) if i % world_size == rank]
    is_done = {s.key for s in mine if s.key in done and not (retry_errors and done[s.key].get("error"))}
    todo = [s for s in mine if s.key not in is_done]
    stats = GenerationStats(rank, world_size, len(mine), len(is_done), 0, 0, 0.0)
    if not todo:
        return stats
    loaded, template = load()
    writer = _Writer(shard_path(run_dir, rank, world_size))
    desc = f"{task.name}" + (f" [{rank}/{world_size}]" if world_size > 1 else "")
    bar = _progress_bar(len(mine), len(is_done), desc, progress)
    start = time.perf_counter()
    try:
        for batch in _chunks(todo, max(1, settings.batch_size)):
            results: dict[str, dict[str, Any]] = {}
            ready: list[tuple[Sample, Any]] = []
            for sample in batch:
                try:
                    ready.append((sample, _open_image(sample.image_path)))
                except Exception as err:  # an unreadable image is this sample's error, not the run's
                    message = f"unreadable image {sample.image_path.name}: {type(err).__name__}: {err}"
                    results[sample.key] = task.record(sample, None, None, message)
            if ready:
                prompts = [
                    build_prompt(s.text, template, loaded.model_type, loaded.processor) for s, _ in ready
                ]
                outputs = _generate_batch(
                    loaded, prompts, [image for _, image in ready], settings.generation_kwargs
                )
                for (sample, _), (answer, n_tokens) in zip(ready, outputs):
                    results[sample.key] = task.record(sample, answer, n_tokens, None)
            writer.write(results[s.key] for s in batch)
            stats.generated += len(ready)
            stats.errors += len(batch) - len(ready)
            bar.update(len(batch))
    finally:
        stats.seconds = time.perf_counter() - start
        bar.close()
        writer.close()
    return stats


def merge_samples(run_dir: Path, task: Task) -> list[dict[str, Any]]:
    """Merge ``samples.jsonl`` and every ``samples.rank{k}.jsonl`` into ``samples.jsonl``.

    One record per key, in the canonical order of ``task.samples`` (records of unknown keys, if any, are kept
    after them); the file is replaced atomically and the shard files are removed afterwards. Returns the
    records. Calling it again is harmless.
    """
    run_dir = Path(run_dir)
    files = _sample_files(run_dir)
    by_key = load_records(run_dir)
    order = [s.key for s in task.samples if s.key in by_key]
    known = set(order)
    order += [k for k in by_key if k not in known]
    records = [by_key[k] for k in order]
    target = run_dir / SAMPLES_FILE
    current = read_samples(target)[0] if target.is_file() else None
    shards = [p for p in files if p != target]
    if (
        current != records
        or shards
        or (target.is_file() and read_samples(target)[1] != target.stat().st_size)
    ):
        tmp = run_dir / f".{SAMPLES_FILE}.tmp-{os.getpid()}"
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        for shard in shards:
            shard.unlink()
    return records


def finish_run(
    task: Task, settings: EvalSettings, run_dir: Path, *, stats: GenerationStats | None = None
) -> dict[str, Any]:
    """Merge the sample files, score, and write ``metrics.json`` and ``report.md`` (process 0 only).

    Raises:
        EvalInputError: some selected samples have no record (a process stopped early): re-run to resume.
    """
    from steer.evals import report

    run_dir = Path(run_dir)
    records = merge_samples(run_dir, task)
    have = {r["key"] for r in records}
    missing = [s.key for s in task.samples if s.key not in have]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(task.samples)} samples have not been generated yet "
            f"(first: {', '.join(missing[:5])}); re-run the same command to resume"
        )
    wanted = {s.key for s in task.samples}
    records = [r for r in records if r["key"] in wanted]
    scores = task.score(records)
    saved = read_settings(run_dir) or {}
    payload = report.metrics_payload(
        task=task.name,
        run_dir=run_dir,
        settings=settings,
        resolved=saved.get("resolved", {}),
        records=records,
        scores=scores,
        stats=dataclasses.asdict(stats) if stats is not None else None,
    )
    report.write_metrics(run_dir, payload)
    report.write_report(run_dir, payload, records, scores)
    return payload


def distributed_context() -> tuple[int, int, Any]:
    """``(rank, world_size, state)``: from ``accelerate.PartialState`` when ``WORLD_SIZE > 1``, else ``(0, 1, None)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # without CUDA, accelerate only sets up a process group (gloo) when asked for CPU explicitly
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world_size:
        raise EvalInputError(
            f"WORLD_SIZE is {world_size} but accelerate set up {state.num_processes} process(es); "
            "launch with `accelerate launch` or `torchrun` so that the processes can wait for each other"
        )
    return state.process_index, state.num_processes, state


def run_eval(
    task: Task,
    settings: EvalSettings,
    run_dir: Path,
    load: Callable[[], Any],
    *,
    retry_errors: bool = False,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    state: Any = None,
) -> dict[str, Any] | None:
    """The whole run: settings check, this process's generation, then (process 0) merge, score and report.

    ``rank``/``world_size`` default to the ``accelerate`` process (``WORLD_SIZE > 1``) or ``0``/``1``; with an
    accelerate ``state`` the processes wait for each other before generating and before merging. Returns the
    metrics payload on process 0, ``None`` elsewhere.
    """
    if rank is None or world_size is None:
        rank, world_size, state = distributed_context()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_settings(run_dir, settings, write=rank == 0)
    if state is not None:
        state.wait_for_everyone()
    stats = generate_shard(
        task,
        settings,
        run_dir,
        load,
        rank=rank,
        world_size=world_size,
        retry_errors=retry_errors,
        progress=progress,
    )
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    return finish_run(task, settings, run_dir, stats=stats)
