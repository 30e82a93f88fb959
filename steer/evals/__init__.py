"""steer.evals: hallucination scoring (CHAIR captions, POPE yes/no answers); no model needed.

Importing the package gives the scorers only. The modules, from the bottom up:

* ``chair``, ``pope``: CHAIR and POPE scoring (files in, metrics out; rules in ``docs/chair.md`` and
  ``docs/pope.md``); ``metrics``: the metric names and directions every command uses; ``bootstrap``: 95%
  intervals over images and paired differences; ``formats``: Hugging Face datasets as inputs; ``builtin``: the
  built-in SynthScenes benchmark; ``loading``: model + processor loading; ``provenance``: versions, commit,
  model files and weights hash.
* outputs: ``report`` (``metrics.json``, ``per_image.json``, ``report.md``), ``html_report`` (``report.html``),
  ``compare`` (``steer eval compare``), ``plots`` (charts, overlays, before/after grids; matplotlib or PIL),
  ``show`` (``steer show``: a method's ``Steering.state`` as a picture).
* ``steer eval`` runs: ``settings`` (the run's settings and ``settings.json``), ``journal`` (``samples.jsonl``
  and its shards), ``prompts`` (templates), ``generation`` (one batch through ``model.generate``),
  ``sharding`` (processes of ``accelerate launch``), ``session`` (load + apply the steer methods),
  ``tasks/`` (one module per benchmark), ``run`` (``run_eval``: the whole run), ``options`` (the command's
  options -> settings), ``cli`` (the Typer apps).
"""

from steer.errors import EvalInputError
from steer.evals.chair import (
    GroundTruth,
    build_gt_from_coco,
    caption_mentions,
    load_captions,
    load_gt,
    load_vocabulary,
    save_gt,
    score_captions,
    singularize,
)
from steer.evals.pope import (
    load_answers,
    load_questions,
    metrics_from_counts,
    parse_answer,
    score_answers,
    summarize_splits,
)

__all__ = [
    "EvalInputError",
    "GroundTruth",
    "build_gt_from_coco",
    "caption_mentions",
    "load_answers",
    "load_captions",
    "load_gt",
    "load_questions",
    "load_vocabulary",
    "metrics_from_counts",
    "parse_answer",
    "save_gt",
    "score_answers",
    "score_captions",
    "singularize",
    "summarize_splits",
]
