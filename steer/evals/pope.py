"""POPE: yes/no object-probing hallucination scoring (Li et al., EMNLP 2023); rules and anchors: ``docs/pope.md``.

Answers are joined to questions on ``question_id`` only (never by line order). Positive class = yes:
TP = label yes & predicted yes, FP = label no & predicted yes, TN = label no & predicted no,
FN = label yes & predicted no; N = scored questions (``unknown`` predictions of the strict parser count in N).

* ``accuracy = (TP + TN) / N``
* ``precision = TP / (TP + FP)``
* ``recall = TP / (TP + FN + unknown_on_yes)``
* ``f1 = 2PR / (P + R)``
* ``yes_ratio = (TP + FP) / N`` (share of *predictions* that are yes)
* ``off_format_rate`` = share of answers that, lower-cased, stripped and without one trailing ``.``/``!``,
  are neither ``yes`` nor ``no``, whichever parser was used.

Any 0/0 is 0.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError

__all__ = [
    "KNOWN_QUESTION_FILES",
    "PARSERS",
    "PopeCounts",
    "Question",
    "is_off_format",
    "load_answers",
    "load_questions",
    "metrics_from_counts",
    "parse_answer",
    "score_answers",
    "summarize_splits",
]

PARSERS = ("official", "opera", "strict")

KNOWN_QUESTION_FILES: dict[str, tuple[str, str]] = {
    "dc9b6c41ad832c48da758cfa85b37d2c": ("random", "current"),
    "64902313fb995e09fa478de9741910d7": ("popular", "current"),
    "3b1a278f8d61acd21b27020d0af817cb": ("adversarial", "current"),
    "b635b20061b1262cba65ed5bef7660a2": ("random", "2023-08"),
    "8233e15e9bb7587b03a624b38a1cee74": ("popular", "2023-08"),
    "b3f9df71709d436462611d7e88ce1447": ("adversarial", "2023-08"),
}
"""md5 of the shipped POPE COCO question files -> (split, version)."""

SPLITS = ("random", "popular", "adversarial")


# --------------------------------------------------------------------------------------------------
# Answer parsing
# --------------------------------------------------------------------------------------------------


def _parse_official(answer: str) -> str:
    text = answer.split(".", 1)[0]
    tokens = text.replace(",", "").split(" ")
    return "no" if any(tok in ("No", "no", "not") for tok in tokens) else "yes"


def _parse_opera(answer: str) -> str:
    tokens = answer.replace(".", "").replace(",", "").split(" ")
    negative = any(tok in ("No", "not", "no", "NO") or tok.endswith("n't") for tok in tokens)
    return "no" if negative else "yes"


def _normalise(answer: str) -> str:
    text = answer.lower().strip()
    return text[:-1] if text.endswith((".", "!")) else text


def _parse_strict(answer: str) -> str:
    text = _normalise(answer)
    return text if text in ("yes", "no") else "unknown"


def parse_answer(answer: str, parser: str = "official") -> str:
    """The prediction ``"yes"``/``"no"`` (``"unknown"`` only for ``strict``) of one stripped answer string.

    * ``official`` (POPE ``evaluate.py``): keep the text before the first ``.``, delete ``,``, split on ``" "``;
      **no** iff a token is exactly ``No``, ``no`` or ``not``, else **yes** (also for empty answers).
    * ``opera`` (OPERA ``pope_eval.py``): delete every ``.`` and ``,``, split on ``" "``; **no** iff a token is
      ``No``/``not``/``no``/``NO`` or ends with ``n't``, else **yes**.
    * ``strict``: lower-case, strip, drop one trailing ``.``/``!``; ``yes``/``no`` or ``unknown``.
    """
    if parser == "official":
        return _parse_official(answer.strip())
    if parser == "opera":
        return _parse_opera(answer.strip())
    if parser == "strict":
        return _parse_strict(answer)
    raise EvalInputError(f"unknown POPE parser {parser!r}; expected one of {', '.join(PARSERS)}")


def is_off_format(answer: str) -> bool:
    """True when the answer, lower-cased, stripped and without one trailing ``.``/``!``, is not yes/no."""
    return _normalise(answer) not in ("yes", "no")


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopeCounts:
    """Confusion counts of one split. ``unknown_yes``/``unknown_no``: strict-parser unknowns by label."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    unknown_yes: int = 0
    unknown_no: int = 0
    off_format: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn + self.unknown_yes + self.unknown_no


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def metrics_from_counts(counts: PopeCounts) -> dict[str, Any]:
    """Counts and fractions: ``n, tp, fp, tn, fn, unknown, accuracy, precision, recall, f1, yes_ratio,
    off_format_rate`` (formulas in the module docstring)."""
    c = counts
    n = c.n
    precision = _ratio(c.tp, c.tp + c.fp)
    recall = _ratio(c.tp, c.tp + c.fn + c.unknown_yes)
    return {
        "n": n,
        "tp": c.tp,
        "fp": c.fp,
        "tn": c.tn,
        "fn": c.fn,
        "unknown": c.unknown_yes + c.unknown_no,
        "accuracy": _ratio(c.tp + c.tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(c.tp + c.fp, n),
        "off_format_rate": _ratio(c.off_format, n),
    }


def summarize_splits(splits: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean F1 and accuracy over splits, and whether TP and FN (hence recall) agree across them."""
    rows = list(splits.values())
    pairs = {(row["tp"], row["fn"]) for row in rows}
    return {
        "mean": {
            "f1": _ratio(sum(row["f1"] for row in rows), len(rows)),
            "accuracy": _ratio(sum(row["accuracy"] for row in rows), len(rows)),
        },
        "checks": {"recall_equal_across_splits": len(pairs) <= 1},
    }


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One POPE question."""

    question_id: int
    image: str
    text: str
    label: str


@dataclass(frozen=True)
class QuestionSet:
    """Questions by id, with the file's md5 and, when the md5 is a known POPE file, its split and version."""

    questions: Mapping[int, Question]
    md5: str
    source: str
    split: str | None
    version: str | None

    def __len__(self) -> int:
        return len(self.questions)


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file is gzip-compressed (md5s are of the uncompressed bytes)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EvalInputError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise EvalInputError(f"expected a file, got a directory: {path}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise EvalInputError(f"{path}: broken gzip file ({err})") from None


def _records(path: Path, raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(line or position, object) for a JSON-lines file or a JSON array."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EvalInputError(f"{path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
    for where, item in items:
        if not isinstance(item, dict):
            raise EvalInputError(f"{path}:{where}: expected a JSON object, got {type(item).__name__}")
    return items


def _question_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise EvalInputError(f"{where}: question_id must be a non-negative integer, got {value!r}")
    return int(value)


def load_questions(path: str | Path) -> QuestionSet:
    """Read a POPE question file (JSON lines or a JSON array of ``{question_id, image, text, label}``).

    Both the 2023-08 and the current COCO files are accepted; a known md5 fills in ``split`` and ``version``.
    """
    path = Path(path)
    raw = _read_bytes(path)
    questions: dict[int, Question] = {}
    for where, item in _records(path, raw):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in item]
        if missing:
            raise EvalInputError(f"{path}:{where}: question lacks {', '.join(missing)}")
        qid = _question_id(item["question_id"], f"{path}:{where}")
        label = str(item["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise EvalInputError(f"{path}:{where}: label must be 'yes' or 'no', got {item['label']!r}")
        if qid in questions:
            raise EvalInputError(f"{path}:{where}: duplicate question_id {qid}")
        questions[qid] = Question(qid, str(item["image"]), str(item["text"]), label)
    if not questions:
        raise EvalInputError(f"{path}: no questions")
    md5 = hashlib.md5(raw).hexdigest()
    split, version = KNOWN_QUESTION_FILES.get(md5, (None, None))
    if split is None:
        split = next((s for s in SPLITS if s in path.name.lower()), None)
    return QuestionSet(questions=questions, md5=md5, source=str(path), split=split, version=version)


@dataclass(frozen=True)
class Answer:
    """One model answer: ``answer`` is the generation; ``text``/``image``/``label``/``prompt`` when recorded."""

    question_id: int
    answer: str
    text: str | None = None
    image: str | None = None
    label: str | None = None
    prompt: str | None = None
    questions_md5: str | None = None


def _answer_from(item: Mapping[str, Any], where: str) -> Answer:
    if "question_id" not in item:
        raise EvalInputError(f"{where}: answer lacks question_id")
    qid = _question_id(item["question_id"], where)
    if "answer" in item:  # steer format: text = the question
        answer = item["answer"]
        text, prompt = item.get("text"), None
    elif "text" in item:  # LLaVA model_vqa format: text = the model's answer, prompt = the question
        answer, text, prompt = item["text"], None, item.get("prompt")
    else:
        raise EvalInputError(f"{where}: answer record has neither 'answer' nor 'text'")
    if not isinstance(answer, str):
        raise EvalInputError(f"{where}: the answer is not a string: {answer!r}")
    return Answer(
        question_id=qid,
        answer=answer.strip(),
        text=None if text is None else str(text),
        image=None if item.get("image") is None else str(item["image"]),
        label=None if item.get("label") is None else str(item["label"]).strip().lower(),
        prompt=None if prompt is None else str(prompt),
        questions_md5=item.get("questions_md5"),
    )


def load_answers(path: str | Path) -> list[Answer]:
    """Read answers: steer's ``{question_id, image, text, label, answer, [questions_md5]}`` records or LLaVA's
    ``{question_id, prompt, text}`` records (``text`` = the answer), JSON lines or a JSON array."""
    path = Path(path)
    answers = [_answer_from(item, f"{path}:{where}") for where, item in _records(path, _read_bytes(path))]
    if not answers:
        raise EvalInputError(f"{path}: no answers (an empty file scores nothing, not a perfect score)")
    return answers


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _ids(ids: Iterable[int], limit: int = 10) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def _check(answer: Answer, question: Question) -> str | None:
    if answer.text is not None and answer.text != question.text:
        return f"question {question.question_id}: answer text {answer.text!r} != question {question.text!r}"
    if answer.image is not None and answer.image != question.image:
        return (
            f"question {question.question_id}: answer image {answer.image!r} != question {question.image!r}"
        )
    if answer.label is not None and answer.label != question.label:
        return (
            f"question {question.question_id}: answer label {answer.label!r} != question {question.label!r}"
        )
    if answer.prompt is not None and question.text not in answer.prompt:
        return f"question {question.question_id}: prompt {answer.prompt!r} does not contain {question.text!r}"
    return None


def score_answers(
    answers: Sequence[Answer],
    questions: QuestionSet,
    *,
    parser: str = "official",
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Score answers against questions, joined on ``question_id``.

    Errors (``EvalInputError``): an unknown parser; an answer recorded with another question file's md5; a
    repeated answer id; answers for ids not in the question file; an answer whose ``text``/``image``/``label``
    (or LLaVA ``prompt``) disagrees with its question; questions without an answer unless ``allow_missing``,
    in which case they are left out of every metric and listed under ``missing``.

    Returns ``{"config", "metrics", "missing", "records"}``; ``records`` follow question-id order.
    """
    if parser not in PARSERS:
        raise EvalInputError(f"unknown POPE parser {parser!r}; expected one of {', '.join(PARSERS)}")
    if not answers:
        raise EvalInputError("no answers to score (an empty input scores nothing, not a perfect score)")
    md5s = {a.questions_md5 for a in answers if a.questions_md5 is not None}
    foreign = md5s - {questions.md5}
    if foreign:
        raise EvalInputError(
            f"answers were generated from a question file with md5 {', '.join(sorted(foreign))}, "
            f"but {questions.source} has md5 {questions.md5}"
        )
    by_id: dict[int, Answer] = {}
    repeated = set()
    for a in answers:
        if a.question_id in by_id:
            repeated.add(a.question_id)
        by_id[a.question_id] = a
    if repeated:
        raise EvalInputError(f"{len(repeated)} question ids are answered more than once: {_ids(repeated)}")
    unknown_ids = set(by_id) - set(questions.questions)
    if unknown_ids:
        raise EvalInputError(
            f"{len(unknown_ids)} answers have ids not in {questions.source}: {_ids(unknown_ids)}"
        )
    for qid in sorted(by_id):
        problem = _check(by_id[qid], questions.questions[qid])
        if problem:
            raise EvalInputError(f"answers do not match {questions.source}: {problem}")
    missing = sorted(set(questions.questions) - set(by_id))
    if missing and not allow_missing:
        raise EvalInputError(
            f"{len(missing)} of {len(questions)} questions have no answer: {_ids(missing)} "
            "(allow_missing=True / --allow-missing scores the rest and reports them)"
        )
    counts = dict.fromkeys(("tp", "fp", "tn", "fn", "unknown_yes", "unknown_no", "off_format"), 0)
    records = []
    for qid in sorted(by_id):
        answer, question = by_id[qid], questions.questions[qid]
        prediction = parse_answer(answer.answer, parser)
        off = is_off_format(answer.answer)
        if prediction == "unknown":
            key = f"unknown_{question.label}"
        elif question.label == "yes":
            key = "tp" if prediction == "yes" else "fn"
        else:
            key = "fp" if prediction == "yes" else "tn"
        counts[key] += 1
        counts["off_format"] += int(off)
        records.append(
            {
                "question_id": qid,
                "image": question.image,
                "text": question.text,
                "label": question.label,
                "answer": answer.answer,
                "prediction": prediction,
                "correct": prediction == question.label,
                "off_format": off,
            }
        )
    metrics = metrics_from_counts(PopeCounts(**counts))
    metrics["missing"] = len(missing)
    config = {
        "parser": parser,
        "questions": questions.source,
        "questions_md5": questions.md5,
        "split": questions.split,
        "version": questions.version,
        "allow_missing": allow_missing,
        "n_questions": len(questions),
        "n_answers": len(by_id),
    }
    return {"config": config, "metrics": metrics, "missing": missing, "records": records}
