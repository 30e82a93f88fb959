"""The POPE task: ask every selected yes/no question about its image, score the answers per split.

Scoring itself is `steer.evals.pope`; this module finds the question files, selects the questions and images
(:func:`pope_task`) and turns the run's records into POPE metrics (:meth:`PopeTask.score`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals import bootstrap, chair, pope
from steer.evals.metrics import pope_metrics
from steer.evals.tasks.base import Sample, Task, data_candidates, list_images
from steer.protocols import POPE_PROMPTS

__all__ = ["POPE_VERSIONS", "PopeTask", "find_questions", "pope_task"]

POPE_VERSIONS = ("2023-08", "current")
"""Question file versions: ``coco_pope_{split}_2023-08.json`` (LLaVA-1.5's anchors) or ``coco_pope_{split}.json``."""


class PopeTask(Task):
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
        super().__init__(samples, selection)
        self.questions = questions
        self.parser = parser

    def score(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Per split: accuracy, precision, recall, F1, yes-ratio, off-format rate (percent) with bootstrap 95%
        intervals over images; errors are left out of the metrics and counted as ``missing``."""
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
        metrics: dict[str, float] = {}
        if len(splits) == 1:
            (only,) = splits.values()
            metrics = pope_metrics(only)
        else:
            metrics["F1 (mean)"] = round(100 * summary["mean"]["f1"], 2)
            metrics["Accuracy (mean)"] = round(100 * summary["mean"]["accuracy"], 2)
            for split, row in splits.items():
                metrics.update(pope_metrics(row, f" ({split})"))
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
        units = bootstrap.pope_units(scored, list(splits))
        return {
            "metrics": metrics,
            "intervals": bootstrap.intervals(units),
            "units": units,
            "details": details,
            "scored": scored,
        }


def find_questions(split: str, version: str, questions_dir: Path | None) -> Path:
    """The question file of ``split`` (``coco_pope_{split}[_2023-08].json``, optionally gzipped) in
    ``questions_dir``, else ``$STEER_POPE_DIR``, else the package data / a checkout's data folders."""
    names = [f"coco_pope_{split}_2023-08.json"] if version == "2023-08" else [f"coco_pope_{split}.json"]
    names += [n + ".gz" for n in names]
    dirs: list[Path] = []
    if questions_dir is not None:
        dirs.append(Path(questions_dir))
    elif os.environ.get("STEER_POPE_DIR"):
        dirs.append(Path(os.environ["STEER_POPE_DIR"]))
    else:
        dirs.extend(dict.fromkeys(p.parent for p in data_candidates("pope", "x")))
    for folder in dirs:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise EvalInputError(
        f"no POPE question file {names[0]} found in {', '.join(map(str, dirs))}; pass --questions FILE or "
        "--questions-dir DIR (the RUCAIBox/POPE COCO files), or set STEER_POPE_DIR"
    )


def _check_options(
    splits: Sequence[str], version: str, prompt: str, parser: str, num_images: int, questions: Path | None
) -> None:
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


def _first_images(qset: pope.QuestionSet, num_images: int) -> set[str]:
    """The first ``num_images`` distinct images of ``qset`` in question-id order."""
    chosen: list[str] = []
    for qid in sorted(qset.questions):
        image = qset.questions[qid].image
        if image not in chosen:
            chosen.append(image)
    return set(chosen[:num_images])


def _image_path(images_dir: Path, image: str, available: Mapping[int, Path]) -> Path:
    """``images_dir/image``, else the file of the same image id under another name (the path may not exist)."""
    path = images_dir / image
    if not path.is_file():
        try:
            path = available.get(chair.parse_image_id(image), path)
        except EvalInputError:
            pass
    return path


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
    _check_options(splits, version, prompt, parser, num_images, questions)
    sets: dict[str, pope.QuestionSet] = {}
    for split in splits:
        if question_files is not None:
            path = Path(question_files[split])
        elif questions is not None:
            path = Path(questions)
        else:
            path = find_questions(split, version, questions_dir)
        sets[split] = pope.load_questions(path)
    keep = _first_images(next(iter(sets.values())), num_images)
    available = list_images(images_dir)
    template = POPE_PROMPTS[prompt]
    samples: list[Sample] = []
    missing: list[str] = []
    subsets: dict[str, pope.QuestionSet] = {}
    for split, qset in sets.items():
        selected = {qid: q for qid, q in sorted(qset.questions.items()) if q.image in keep}
        subsets[split] = dataclasses.replace(qset, questions=selected)
        for qid, q in selected.items():
            path = _image_path(images_dir, q.image, available)
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
