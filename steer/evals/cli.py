"""Command-line scoring: ``steer chair ...`` and ``steer pope ...`` (two Typer apps mounted by ``steer.cli``).

Bad input prints one ``error: ...`` line on stderr and exits with code 2. ``--json`` prints exactly one flat JSON
object on stdout (rates in percent, rounded as papers print them: CHAIR one decimal, POPE two; raw counts
alongside). Per-item records go to ``--out`` or next to the input (``<stem>.chair.jsonl`` /
``<stem>.pope.jsonl``), with the full result (config, overall metrics) in ``<records stem>.summary.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from steer.evals import chair, pope
from steer.evals.chair import EvalInputError

chair_app = typer.Typer(help="CHAIR caption hallucination scoring.", no_args_is_help=True)
pope_app = typer.Typer(help="POPE yes/no hallucination scoring.", no_args_is_help=True)


@chair_app.callback()
def _chair_group() -> None:
    """CHAIR (Rohrbach et al. 2018): hallucinated COCO objects in generated captions."""


@pope_app.callback()
def _pope_group() -> None:
    """POPE (Li et al. 2023): yes/no questions about COCO objects."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn input errors into one stderr line and exit code 2 (no traceback)."""
    try:
        yield
    except EvalInputError as err:
        raise _fail(str(err)) from None
    except OSError as err:
        raise _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err)) from None


def _records_path(source: Path, out: Path | None, kind: str) -> Path:
    return out if out is not None else source.with_name(f"{source.stem}.{kind}.jsonl")


def _summary_path(records: Path) -> Path:
    name = records.name[: -len(".jsonl")] if records.name.endswith(".jsonl") else records.name
    return records.with_name(f"{name}.summary.json")


def _write(records: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    try:
        with path.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        summary_path = _summary_path(path)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    except OSError as err:
        raise EvalInputError(
            f"cannot write records to {path} ({err.strerror or err}); choose --out"
        ) from None
    return summary_path


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise EvalInputError(f"{what} not found: {path}")


def _show(title: str, rows: list[tuple[str, str]], notes: list[str]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


def _echo_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise EvalInputError(f"unknown {option} {value!r}; expected one of {', '.join(allowed)}")
    return value


# --------------------------------------------------------------------------------------------------
# steer chair
# --------------------------------------------------------------------------------------------------


def _pct1(x: float) -> float:
    return round(100 * x, 1)


@chair_app.command("score")
def chair_score(
    captions: Path = typer.Option(
        ..., "--captions", help="Captions, JSONL or JSON array of {image_id, caption}."
    ),
    gt_objects: Path | None = typer.Option(
        None,
        "--gt-objects",
        help="Ground-truth map {image_id: [objects]} (.json or .json.gz). Default: shipped.",
    ),
    coco_annotations: Path | None = typer.Option(
        None,
        "--coco-annotations",
        help="Folder with instances_*2014.json / captions_*2014.json to build GT from.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one flat JSON object with the metrics."),
    out: Path | None = typer.Option(
        None, "--out", help="Per-caption records (JSONL). Default: <stem>.chair.jsonl."
    ),
    image_key: str = typer.Option("image_id", help="Key of the image id in each caption record."),
    caption_key: str = typer.Option("caption", help="Key of the caption text in each record."),
    duplicates: str = typer.Option("keep", help="Repeated image ids: keep (score all) or last."),
    truncate_incomplete: bool = typer.Option(
        False, help="Cut captions not ending in .!? after their last '.'."
    ),
    missing_gt: str = typer.Option("error", help="Image ids absent from GT: error or empty."),
    lineage: str = typer.Option(
        "original", help="original (pattern singulariser) or opera (needs NLTK data)."
    ),
) -> None:
    """Score captions: CHAIR_s, CHAIR_i, Recall, Len (percent, one decimal)."""
    with _clean_errors():
        _choice(duplicates, chair.DUPLICATES, "--duplicates")
        _choice(missing_gt, chair.MISSING_GT, "--missing-gt")
        _choice(lineage, chair.LINEAGES, "--lineage")
        if gt_objects is not None and coco_annotations is not None:
            raise EvalInputError("give either --gt-objects or --coco-annotations, not both")
        _require_file(captions, "captions file")
        items = chair.load_captions(captions, image_key=image_key, caption_key=caption_key)
        if coco_annotations is not None:
            gt = chair.build_gt_from_coco(coco_annotations, image_ids={c["image_id"] for c in items})
        else:
            if gt_objects is not None:
                _require_file(gt_objects, "ground-truth file")
            gt = chair.load_gt(gt_objects)
        result = chair.score_captions(
            items,
            gt,
            lineage=lineage,
            duplicates=duplicates,
            truncate_incomplete=truncate_incomplete,
            missing_gt=missing_gt,
        )
        records_path = _records_path(captions, out, "chair")
        summary = {
            "config": {**result["config"], "captions_file": str(captions)},
            "overall": result["overall"],
        }
        summary_path = _write(result["captions"], summary, records_path)
    overall, counts = result["overall"], result["overall"]["counts"]
    if as_json:
        _echo_json(
            {
                "CHAIRs": _pct1(overall["CHAIR_s"]),
                "CHAIRi": _pct1(overall["CHAIR_i"]),
                "Recall": _pct1(overall["Recall"]),
                "Len": round(overall["Len"], 1),
                "Precision": _pct1(overall["Precision"]),
                "F1": _pct1(overall["F1"]),
                **counts,
            }
        )
    else:
        rows = [
            (
                "CHAIR_s",
                f"{100 * overall['CHAIR_s']:.1f}  ({counts['hallucinated_captions']}/{counts['captions']})",
            ),
            (
                "CHAIR_i",
                f"{100 * overall['CHAIR_i']:.1f}  ({counts['hallucinated_mentions']}/{counts['mentions']})",
            ),
            ("Recall", f"{100 * overall['Recall']:.1f}  ({counts['recalled']}/{counts['gt_objects']})"),
            ("Len", f"{overall['Len']:.1f}  ({counts['tokens']} tokens)"),
            ("Precision", f"{100 * overall['Precision']:.1f}"),
            ("F1", f"{100 * overall['F1']:.1f}"),
        ]
        _show(
            f"CHAIR ({result['config']['lineage']} lineage) - {captions.name}",
            rows,
            [f"ground truth: {result['config']['gt_source']} (md5 {result['config']['gt_md5']})"],
        )
    typer.echo(f"records: {records_path}; summary: {summary_path}", err=True)


@chair_app.command("build-gt")
def chair_build_gt(
    coco_annotations: Path = typer.Option(
        ..., "--coco-annotations", help="Folder with COCO 2014 annotations."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Where to write {image_id: sorted objects} (.json or .json.gz)."
    ),
) -> None:
    """Build the CHAIR ground-truth map from COCO 2014 instances + captions and compare it to the shipped one."""
    with _clean_errors():
        gt = chair.build_gt_from_coco(coco_annotations)
        md5 = chair.save_gt(gt, out)
        differing = chair.compare_gt(gt)
    typer.echo(
        f"wrote {len(gt)} images to {out} (md5 {md5}); {len(differing)} differ from the shipped map"
        + (f": {', '.join(map(str, differing[:10]))}" if differing else "")
    )


# --------------------------------------------------------------------------------------------------
# steer pope
# --------------------------------------------------------------------------------------------------


def _pct2(x: float) -> float:
    return round(100 * x, 2)


@pope_app.command("score")
def pope_score(
    answers: Path = typer.Option(..., "--answers", help="Answers JSONL (steer or LLaVA format)."),
    questions: Path = typer.Option(
        ..., "--questions", help="POPE question file the answers were generated from."
    ),
    parser: str = typer.Option("official", "--parser", help="official, opera or strict."),
    as_json: bool = typer.Option(False, "--json", help="Print one flat JSON object with the metrics."),
    out: Path | None = typer.Option(
        None, "--out", help="Per-question records (JSONL). Default: <stem>.pope.jsonl."
    ),
    allow_missing: bool = typer.Option(
        False, help="Score the answered questions and report the missing ones."
    ),
) -> None:
    """Score yes/no answers: accuracy, precision, recall, F1, yes-ratio, off-format rate (percent)."""
    with _clean_errors():
        _choice(parser, pope.PARSERS, "--parser")
        _require_file(answers, "answers file")
        _require_file(questions, "questions file")
        qset = pope.load_questions(questions)
        result = pope.score_answers(
            pope.load_answers(answers), qset, parser=parser, allow_missing=allow_missing
        )
        records_path = _records_path(answers, out, "pope")
        summary = {
            "config": {**result["config"], "answers_file": str(answers)},
            "metrics": result["metrics"],
            "missing": result["missing"],
        }
        summary_path = _write(result["records"], summary, records_path)
    m = result["metrics"]
    rates = ("accuracy", "precision", "recall", "f1", "yes_ratio", "off_format_rate")
    if as_json:
        payload: dict[str, Any] = {key: _pct2(m[key]) for key in rates}
        payload.update({key: m[key] for key in ("tp", "fp", "tn", "fn", "n", "unknown", "missing")})
        _echo_json(payload)
    else:
        fmt: Callable[[str], str] = lambda key: f"{100 * m[key]:.2f}"  # noqa: E731
        rows = [(key, fmt(key)) for key in rates]
        rows += [(key, str(m[key])) for key in ("n", "tp", "fp", "tn", "fn", "unknown", "missing")]
        cfg = result["config"]
        notes = [
            f"questions: {cfg['questions']} (split {cfg['split']}, version {cfg['version']}, md5 {cfg['questions_md5']})"
        ]
        if result["missing"]:
            notes.append(
                f"[yellow]{len(result['missing'])} questions had no answer and were not scored[/yellow]"
            )
        _show(f"POPE ({parser} parser) - {answers.name}", rows, notes)
    if result["missing"]:
        typer.echo(
            f"warning: {len(result['missing'])} questions have no answer (listed in {summary_path})", err=True
        )
    typer.echo(f"records: {records_path}; summary: {summary_path}", err=True)
