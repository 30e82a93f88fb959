"""steer.evals: hallucination scoring (CHAIR captions, POPE yes/no answers); no model needed."""

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
