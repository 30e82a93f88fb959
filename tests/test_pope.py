"""POPE scorer: parsers, metrics, joining on question_id, both question-file versions, and the CLI."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steer.evals import pope
from steer.evals.chair import EvalInputError
from steer.evals.cli import pope_app

DATA = Path(__file__).parent / "data"
CURRENT = DATA / "coco_pope_random.json.gz"  # 3000 questions
AUGUST = DATA / "coco_pope_random_2023-08.json.gz"  # 2910 questions


@pytest.fixture(scope="module")
def current() -> pope.QuestionSet:
    return pope.load_questions(CURRENT)


@pytest.fixture(scope="module")
def august() -> pope.QuestionSet:
    return pope.load_questions(AUGUST)


def steer_answers(qset: pope.QuestionSet, reply) -> list[dict]:
    """Answer records in steer's format, ``reply(question) -> answer string``."""
    return [
        {
            "question_id": q.question_id,
            "image": q.image,
            "text": q.text,
            "label": q.label,
            "answer": reply(q),
            "split": qset.split,
            "questions_md5": qset.md5,
        }
        for q in qset.questions.values()
    ]


def to_answers(records: list[dict]) -> list[pope.Answer]:
    return [pope._answer_from(r, f"record {i}") for i, r in enumerate(records)]


def anchor_reply(qset: pope.QuestionSet):
    """Answer "No" to the first 317 positives and "Yes" to the first 31 negatives: LLaVA-1.5-7B's random row."""
    yes = [q.question_id for q in qset.questions.values() if q.label == "yes"][:317]
    no = [q.question_id for q in qset.questions.values() if q.label == "no"][:31]
    wrong = set(yes) | set(no)

    def reply(q: pope.Question) -> str:
        correct = q.question_id not in wrong
        return ("Yes" if q.label == "yes" else "No") if correct else ("No" if q.label == "yes" else "Yes")

    return reply


# ---------------------------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No.", "no"),
        ("Yes.", "yes"),
        ("No, there is no dog.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is not a dog in the image.", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("Yes, no", "no"),  # commas are deleted, then "no" is a token
        ("Yes,no", "yes"),  # comma deletion glues "Yesno"
        ("NO", "yes"),
        ("Not really", "yes"),
        ("Nope", "yes"),  # exact tokens only, no lower-casing
        ("There isn't a dog", "yes"),
        ("no!", "yes"),
        ("(no)", "yes"),
        ("No\nthere is none", "yes"),  # split on " " only: "No\nthere" is one token
        ("", "yes"),
        ("I cannot tell", "yes"),
    ],
)
def test_official_parser(answer: str, expected: str) -> None:
    assert pope.parse_answer(answer, "official") == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("NO", "no"),
        ("No.", "no"),
        ("There isn't a dog", "no"),
        ("Yes. No.", "no"),
        ("Not really", "yes"),
        ("no!", "yes"),
        ("", "yes"),
        ("Yes, it is not", "no"),
    ],
)
def test_opera_parser(answer: str, expected: str) -> None:
    assert pope.parse_answer(answer, "opera") == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("NO!", "no"),
        (" no ", "no"),
        ("No..", "unknown"),
        ("Yes, there is", "unknown"),
        ("", "unknown"),
    ],
)
def test_strict_parser(answer: str, expected: str) -> None:
    assert pope.parse_answer(answer, "strict") == expected


def test_unknown_parser() -> None:
    with pytest.raises(EvalInputError, match="unknown POPE parser 'fuzzy'"):
        pope.parse_answer("Yes", "fuzzy")


@pytest.mark.parametrize(
    ("answer", "off"),
    [("Yes", False), ("no.", False), ("NO!", False), ("Yes, there is.", True), ("Nope", True), ("", True)],
)
def test_off_format(answer: str, off: bool) -> None:
    assert pope.is_off_format(answer) is off


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_by_hand() -> None:
    m = pope.metrics_from_counts(pope.PopeCounts(tp=3, fp=1, tn=2, fn=2))
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(0.625)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)
    empty = pope.metrics_from_counts(pope.PopeCounts())
    assert empty["accuracy"] == empty["precision"] == empty["f1"] == 0.0


def test_anchor_random_row_arithmetic() -> None:
    m = pope.metrics_from_counts(pope.PopeCounts(tp=1183, fp=31, tn=1379, fn=317))
    got = [round(100 * m[k], 2) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
    assert m["n"] == 2910
    assert got == [88.04, 97.45, 78.87, 87.18, 41.72]


def test_strict_unknowns_are_misses() -> None:
    m = pope.metrics_from_counts(pope.PopeCounts(tp=3, fp=1, tn=2, fn=1, unknown_yes=1, unknown_no=2))
    assert m["n"] == 10 and m["unknown"] == 3
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["yes_ratio"] == pytest.approx(0.4)


def test_summarize_splits() -> None:
    a = pope.metrics_from_counts(pope.PopeCounts(tp=3, fp=1, tn=2, fn=2))
    b = pope.metrics_from_counts(pope.PopeCounts(tp=3, fp=3, tn=0, fn=2))
    summary = pope.summarize_splits({"random": a, "popular": b})
    assert summary["mean"]["f1"] == pytest.approx((2 / 3 + 0.545454545) / 2)
    assert summary["checks"]["recall_equal_across_splits"] is True
    c = pope.metrics_from_counts(pope.PopeCounts(tp=4, fp=3, tn=0, fn=1))
    assert (
        pope.summarize_splits({"random": a, "adversarial": c})["checks"]["recall_equal_across_splits"]
        is False
    )


# ---------------------------------------------------------------------------------------------- question files


def test_both_question_versions(current: pope.QuestionSet, august: pope.QuestionSet) -> None:
    assert (len(current), current.split, current.version) == (3000, "random", "current")
    assert (len(august), august.split, august.version) == (2910, "random", "2023-08")
    assert current.md5 == "dc9b6c41ad832c48da758cfa85b37d2c"
    assert august.md5 == "b635b20061b1262cba65ed5bef7660a2"
    for qset, n_no in ((current, 1500), (august, 1410)):
        labels = [q.label for q in qset.questions.values()]
        assert labels.count("yes") == 1500 and labels.count("no") == n_no
        assert sorted(qset.questions) == list(range(1, len(qset) + 1))
        assert len({q.image for q in qset.questions.values()}) == 500
    positives = [
        [(q.image, q.text.replace("imange", "image")) for q in s.questions.values() if q.label == "yes"]
        for s in (current, august)
    ]
    assert positives[0] == positives[1]
    assert sum("imange" in q.text for q in august.questions.values()) == 144


def test_question_file_as_json_array(tmp_path: Path, current: pope.QuestionSet) -> None:
    path = tmp_path / "gqa_pope_random.json"
    items = [
        {"question_id": q.question_id, "image": q.image, "text": q.text, "label": q.label}
        for q in list(current.questions.values())[:12]
    ]
    path.write_text(json.dumps(items, indent=2))
    qset = pope.load_questions(path)
    assert len(qset) == 12 and qset.split == "random" and qset.version is None
    assert qset.questions[2].label == "no"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}',
            "label must be",
        ),
        ('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?"}', "lacks label"),
        ('{"question_id": "x1", "image": "a.jpg", "text": "t", "label": "yes"}', "question_id must be"),
        ('{"question_id": 1, "image": "a.jpg", "text": "t", "label": "yes"', "malformed JSON line"),
    ],
)
def test_bad_question_files(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "q.json"
    path.write_text(line + "\n")
    with pytest.raises(EvalInputError, match=message):
        pope.load_questions(path)


# ---------------------------------------------------------------------------------------------- joining


def test_anchor_run_on_august_file(august: pope.QuestionSet) -> None:
    result = pope.score_answers(to_answers(steer_answers(august, anchor_reply(august))), august)
    m = result["metrics"]
    assert (m["n"], m["tp"], m["fp"], m["tn"], m["fn"]) == (2910, 1183, 31, 1379, 317)
    assert round(100 * m["f1"], 2) == 87.18 and round(100 * m["accuracy"], 2) == 88.04
    assert m["off_format_rate"] == 0 and result["missing"] == []
    assert result["config"]["version"] == "2023-08"
    assert [r["question_id"] for r in result["records"][:3]] == [1, 2, 3]


def test_shuffled_answers_give_identical_metrics(august: pope.QuestionSet) -> None:
    records = steer_answers(august, anchor_reply(august))
    base = pope.score_answers(to_answers(records), august)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != records
    again = pope.score_answers(to_answers(shuffled), august)
    assert again["metrics"] == base["metrics"]
    assert again["records"] == base["records"]


def test_missing_answers_are_reported(current: pope.QuestionSet) -> None:
    records = [r for r in steer_answers(current, lambda q: "Yes") if r["question_id"] not in (5, 17, 2999)]
    with pytest.raises(EvalInputError, match=r"3 of 3000 questions have no answer: 5, 17, 2999"):
        pope.score_answers(to_answers(records), current)
    result = pope.score_answers(to_answers(records), current, allow_missing=True)
    assert result["missing"] == [5, 17, 2999]
    assert result["metrics"]["missing"] == 3 and result["metrics"]["n"] == 2997
    # odd ids are positives in the current file (yes, no, yes, no ...): the three missing ones are all positives
    assert (result["metrics"]["tp"], result["metrics"]["fp"]) == (1497, 1500)


def test_yes_ratio_follows_predictions(current: pope.QuestionSet) -> None:
    m = pope.score_answers(to_answers(steer_answers(current, lambda q: "Yes")), current)["metrics"]
    assert m["yes_ratio"] == 1.0 and m["recall"] == 1.0 and m["accuracy"] == 0.5
    m = pope.score_answers(to_answers(steer_answers(current, lambda q: "No")), current)["metrics"]
    assert m["yes_ratio"] == 0.0 and m["f1"] == 0.0


def test_off_format_rate_counted(current: pope.QuestionSet) -> None:
    reply = {"yes": "Yes, there is a {}.", "no": "No."}
    records = steer_answers(current, lambda q: reply[q.label])
    for parser in ("official", "opera", "strict"):
        m = pope.score_answers(to_answers(records), current, parser=parser)["metrics"]
        assert m["off_format_rate"] == 0.5
    strict = pope.score_answers(to_answers(records), current, parser="strict")["metrics"]
    assert (strict["unknown"], strict["tp"], strict["tn"], strict["recall"]) == (1500, 0, 1500, 0.0)
    official = pope.score_answers(to_answers(records), current)["metrics"]
    assert official["accuracy"] == 1.0


def test_august_answers_against_current_file_raise(
    current: pope.QuestionSet, august: pope.QuestionSet
) -> None:
    records = steer_answers(august, lambda q: "Yes")
    with pytest.raises(EvalInputError, match="question file with md5 b635b200"):
        pope.score_answers(to_answers(records), current)
    for r in records:
        del r["questions_md5"]
    with pytest.raises(EvalInputError, match=r"answer text 'Is there an umbrella in the imange\?'"):
        pope.score_answers(to_answers(records), current)
    for r in records:
        del r["text"]
        del r["image"]
    with pytest.raises(EvalInputError, match="answer label"):
        pope.score_answers(to_answers(records), current, allow_missing=True)
    for r in records:
        del r["label"]
    with pytest.raises(EvalInputError, match="90 of 3000 questions have no answer"):
        pope.score_answers(to_answers(records), current)


def test_2910_answers_against_3000_file_without_text_raise(
    current: pope.QuestionSet, august: pope.QuestionSet
) -> None:
    """LLaVA-style records carry only ids and the prompt; the prompt check catches the renumbering."""
    records = [
        {
            "question_id": q.question_id,
            "prompt": q.text + "\nAnswer the question using a single word or phrase.",
            "text": "Yes",
        }
        for q in august.questions.values()
    ]
    assert pope.score_answers(to_answers(records), august)["metrics"]["n"] == 2910
    with pytest.raises(EvalInputError, match="prompt"):
        pope.score_answers(to_answers(records), current, allow_missing=True)


def test_unknown_and_repeated_ids(current: pope.QuestionSet) -> None:
    records = steer_answers(current, lambda q: "Yes")
    extra = dict(records[0], question_id=3001)
    with pytest.raises(EvalInputError, match="1 answers have ids not in .*: 3001"):
        pope.score_answers(to_answers([*records, extra]), current)
    with pytest.raises(EvalInputError, match="answered more than once: 1"):
        pope.score_answers(to_answers([*records, records[0]]), current)


def test_load_llava_answers(tmp_path: Path, current: pope.QuestionSet) -> None:
    path = tmp_path / "answers.jsonl"
    lines = [
        json.dumps(
            {
                "question_id": q.question_id,
                "prompt": q.text,
                "text": " No \n",
                "answer_id": "x",
                "model_id": "llava-v1.5-7b",
                "metadata": {},
            }
        )
        for q in current.questions.values()
    ]
    path.write_text("\n".join(lines) + "\n")
    answers = pope.load_answers(path)
    assert answers[0].answer == "No" and answers[0].prompt == current.questions[1].text
    m = pope.score_answers(answers, current)["metrics"]
    assert (m["tn"], m["fn"]) == (1500, 1500)


def test_answers_need_an_answer_field(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "prompt": "Is there a dog?"}\n')
    with pytest.raises(EvalInputError, match="neither 'answer' nor 'text'"):
        pope.load_answers(path)


# ---------------------------------------------------------------------------------------------- CLI


def _write_answers(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_cli_json_is_one_object(tmp_path: Path, august: pope.QuestionSet) -> None:
    questions = tmp_path / "coco_pope_random_2023-08.json"
    questions.write_bytes(gzip.decompress(AUGUST.read_bytes()))
    answers = tmp_path / "run.jsonl"
    _write_answers(answers, steer_answers(august, anchor_reply(august)))
    result = CliRunner().invoke(
        pope_app, ["score", "--answers", str(answers), "--questions", str(questions), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    payload = json.loads(result.stdout)
    intervals = {k: payload.pop(k) for k in list(payload) if k.endswith("_ci95")}
    assert set(intervals) == {
        f"{m}_ci95" for m in ("Accuracy", "Precision", "Recall", "F1", "Yes-ratio", "Off-format")
    }
    assert intervals["F1_ci95"][0] < 87.18 < intervals["F1_ci95"][1]
    assert payload == {
        "Accuracy": 88.04,
        "Precision": 97.45,
        "Recall": 78.87,
        "F1": 87.18,
        "Yes-ratio": 41.72,
        "Off-format": 0.0,
        "tp": 1183,
        "fp": 31,
        "tn": 1379,
        "fn": 317,
        "n": 2910,
        "unknown": 0,
        "missing": 0,
    }
    records = [json.loads(line) for line in (tmp_path / "run.pope.jsonl").read_text().splitlines()]
    assert len(records) == 2910
    assert records[0] == {
        "question_id": 1,
        "image": "COCO_val2014_000000310196.jpg",
        "text": "Is there a snowboard in the image?",
        "label": "yes",
        "answer": "No",
        "prediction": "no",
        "correct": False,
        "off_format": False,
    }
    summary = json.loads((tmp_path / "run.pope.summary.json").read_text())
    assert summary["config"]["questions_md5"] == "b635b20061b1262cba65ed5bef7660a2"


def test_cli_table_and_opera_parser(tmp_path: Path, current: pope.QuestionSet) -> None:
    answers = tmp_path / "run.jsonl"
    _write_answers(
        answers, steer_answers(current, lambda q: "Yes" if q.label == "yes" else "There isn't one.")
    )
    out = tmp_path / "records.jsonl"
    args = ["score", "--answers", str(answers), "--questions", str(CURRENT), "--out", str(out)]
    table = CliRunner().invoke(pope_app, args)
    assert table.exit_code == 0, table.output
    assert "Accuracy" in table.stdout and "50.00" in table.stdout  # official: "isn't" is not a no
    opera = CliRunner().invoke(pope_app, [*args, "--parser", "opera", "--json"])
    assert opera.exit_code == 0, opera.output
    assert json.loads(opera.stdout)["Accuracy"] == 100.0
    assert json.loads(opera.stdout)["Off-format"] == 50.0
    assert len(out.read_text().splitlines()) == 3000


def test_cli_allow_missing_reports(tmp_path: Path, current: pope.QuestionSet) -> None:
    answers = tmp_path / "run.jsonl"
    _write_answers(answers, steer_answers(current, lambda q: "Yes")[:-2])
    runner = CliRunner()
    args = ["score", "--answers", str(answers), "--questions", str(CURRENT), "--json"]
    failed = runner.invoke(pope_app, args)
    assert failed.exit_code == 2 and "2 of 3000 questions have no answer: 2999, 3000" in failed.stderr
    result = runner.invoke(pope_app, [*args, "--allow-missing"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["missing"] == 2 and json.loads(result.stdout)["n"] == 2998
    assert "warning: 2 questions have no answer" in result.stderr


@pytest.mark.parametrize(
    ("answers", "extra", "message"),
    [
        (None, [], "answers file not found"),
        ('{"question_id": 1, "answer": "Yes"}\n{"question_id": 2,\n', [], "run.jsonl:2: malformed JSON line"),
        ('{"question_id": 1, "answer": "Yes"}\n', ["--parser", "fuzzy"], "unknown --parser 'fuzzy'"),
        ('{"question_id": 1, "answer": "Yes"}\n', [], "2999 of 3000 questions have no answer"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, answers: str | None, extra: list[str], message: str) -> None:
    path = tmp_path / "run.jsonl"
    if answers is not None:
        path.write_text(answers)
    result = CliRunner().invoke(
        pope_app, ["score", "--answers", str(path), "--questions", str(CURRENT), *extra]
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_empty_answers_are_an_error_not_a_perfect_score(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text("")
    result = CliRunner().invoke(
        pope_app, ["score", "--answers", str(path), "--questions", str(CURRENT), "--allow-missing"]
    )
    assert result.exit_code == 2 and "no answers" in result.stderr and result.stderr.count("\n") == 1
    with pytest.raises(EvalInputError, match="no answers to score"):
        pope.score_answers([], pope.load_questions(CURRENT), allow_missing=True)
