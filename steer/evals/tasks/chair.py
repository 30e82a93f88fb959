"""The CHAIR task: caption every selected COCO image with one prompt, score the captions against ground truth.

Scoring itself is `steer.evals.chair`; this module selects the images (:func:`chair_task`) and turns the run's
records into CHAIR metrics (:meth:`ChairTask.score`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals import bootstrap, chair
from steer.evals.metrics import chair_metrics
from steer.evals.tasks.base import IMAGE_SUFFIXES, Sample, Task, data_candidates, list_images, md5_lines
from steer.protocols import CHAIR_PROMPT

__all__ = ["ChairTask", "chair_task", "opera500_ids"]


class ChairTask(Task):
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
        super().__init__(samples, selection)
        self.gt = gt
        self.lineage = lineage
        self.truncate_incomplete = truncate_incomplete
        self.vocabulary = vocabulary

    def score(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``{"metrics": {CHAIR_s, CHAIR_i, Recall, Len, Precision, F1} in percent, "intervals"
        (bootstrap 95% over images), "units" (per-image counts), "details", "scored"}``."""
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
        units = bootstrap.chair_units(result["captions"])
        return {
            "metrics": chair_metrics(overall),
            "intervals": bootstrap.intervals(units),
            "units": units,
            "details": {"config": result["config"], "overall": overall},
            "scored": result["captions"],
        }


def opera500_ids() -> list[int] | None:
    """The OPERA/VISTA/CCA 500 COCO val2014 CHAIR image ids, when a copy of the list can be found."""
    for path in data_candidates("chair", "opera500_image_ids.txt"):
        if path.is_file():
            return [int(line) for line in path.read_text().split() if line.strip()]
    return None


def _first_ids(
    available: Mapping[int, Path], images_dir: Path, image_ids: Path | None, num_images: int
) -> tuple[list[int], str]:
    """The selected image ids and where the selection comes from (``file:NAME``, ``opera500`` or ``sorted``)."""
    if image_ids is not None:
        try:
            wanted = [chair.parse_image_id(t) for t in Path(image_ids).read_text().split()]
        except OSError as err:
            raise EvalInputError(f"--image-ids: cannot read {image_ids} ({err.strerror or err})") from None
        missing = [i for i in wanted[:num_images] if i not in available]
        if missing:
            raise EvalInputError(
                f"{len(missing)} images of {image_ids} are not in {images_dir}: "
                + ", ".join(map(str, missing[:5]))
                + (" ..." if len(missing) > 5 else "")
            )
        return wanted[:num_images], f"file:{Path(image_ids).name}"
    opera = opera500_ids()
    if opera and all(i in available for i in opera):
        return opera[:num_images], "opera500"
    return sorted(available)[:num_images], "sorted"


def _no_images_message(images_dir: Path, gt: chair.GroundTruth, shipped: bool) -> str:
    """Say what the folder holds and how its files must be named for the ground truth in use."""
    files = [
        p.name
        for p in sorted(images_dir.iterdir())
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
    ]
    held = (
        f"it holds {len(files)} image files ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''})"
        if files
        else "it holds no image files"
    )
    some = sorted(gt.objects)[:2]
    if shipped:
        example = ", ".join(f"COCO_val2014_{i:012d}.jpg" for i in some)
        where = "the COCO val2014 images (the shipped ground truth is COCO 2014's)"
    else:
        example = ", ".join(f"image_{i}.png" for i in some)
        where = f"images named by the ids of the ground truth in use ({gt.source})"
    return (
        f"--images {images_dir}: {held}, none named by an image id. CHAIR needs {where}: the id is the last "
        f"number in the file name, e.g. {example}"
    )


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

    ``synonyms`` is a CHAIR synonym table other than the shipped COCO one (e.g. the built-in benchmark's); a
    ground truth whose objects are not in the table is refused here, before anything is generated.

    Selection: the ids of ``image_ids`` (one per line) when given; else the OPERA-500 list when every one of its
    images is in ``images_dir``; else the image files sorted by id. The first ``num_images`` are kept. Image ids
    missing from the ground truth are an error (before anything is generated).
    """
    images_dir = Path(images_dir)
    if num_images < 1:
        raise EvalInputError(f"--num-images must be >= 1, got {num_images}")
    if lineage not in chair.LINEAGES:
        raise EvalInputError(f"unknown --lineage {lineage!r}; expected one of {', '.join(chair.LINEAGES)}")
    available = list_images(images_dir)
    gt = chair.load_gt(gt_objects)
    ids, source = _first_ids(available, images_dir, image_ids, num_images)
    if not ids:
        raise EvalInputError(_no_images_message(images_dir, gt, gt_objects is None))
    vocabulary = chair.load_vocabulary(synonyms) if synonyms is not None else None
    absent = [i for i in ids if i not in gt.objects]
    if absent:
        raise EvalInputError(
            f"{len(absent)} image ids are not in the CHAIR ground truth ({gt.source}): "
            + ", ".join(map(str, absent[:5]))
            + (" ..." if len(absent) > 5 else "")
        )
    chair.check_vocabulary({i: gt.objects[i] for i in ids}, vocabulary or chair.load_vocabulary(), gt.source)
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
        "image_ids_md5": md5_lines(ids),
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
