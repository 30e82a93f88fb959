"""The evaluation commands, three Typer apps mounted by ``steer.cli``: ``steer chair ...`` and ``steer pope ...``
(scoring files of captions/answers) and ``steer eval ...`` (generate + score in one run, `steer.evals.run`).

Bad input prints one ``error: ...`` line on stderr and exits with code 2. ``--json`` prints exactly one flat JSON
object on stdout (rates in percent, rounded as papers print them: CHAIR one decimal, POPE two; raw counts
alongside). Per-item records go to ``--out`` or next to the input (``<stem>.chair.jsonl`` /
``<stem>.pope.jsonl``), with the full result (config, overall metrics) in ``<records stem>.summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from steer.errors import EvalInputError, SteerError
from steer.evals import bootstrap, chair, compare, formats, html_report, journal, pope, report
from steer.evals.metrics import POPE_METRICS, POPE_SCORER_KEYS, chair_metrics, direction, pope_metrics
from steer.evals.options import Bench, RunOptions, check_choice, default_out
from steer.evals.run import run_eval
from steer.evals.session import session_loader
from steer.evals.sharding import distributed_context, process_device_map
from steer.evals.tasks import Task, chair_task, pope_task
from steer.protocols import CHAIR_PROMPT, POPE_PROMPTS

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


# --------------------------------------------------------------------------------------------------
# steer chair
# --------------------------------------------------------------------------------------------------


def _interval_text(interval: Any, decimals: int) -> str:
    if not interval:
        return ""
    return f"[{interval[0]:.{decimals}f}, {interval[1]:.{decimals}f}]"


def _builtin_synonyms(gt_objects: Path) -> Path | None:
    """The synonym table beside a built-in split's ground truth (its folder holds ``split.json``)."""
    folder = gt_objects.resolve().parent
    table = folder / "synonyms.txt"
    return table if (folder / "split.json").is_file() and table.is_file() else None


def _run_files(captions: Path) -> tuple[Path | None, Path | None] | None:
    """When ``captions`` is the ``samples.jsonl`` of a ``steer eval chair`` run: the ground-truth and synonym
    files that run was scored with (``None`` = the shipped COCO ones). ``None`` when it is not a run's file.

    Raises:
        EvalInputError: the run used files that cannot be found any more.
    """
    from steer.evals import builtin, settings

    saved = settings.read_settings(captions.resolve().parent)
    if saved is None or saved["settings"].get("task") != "chair":
        return None
    selection = saved["settings"].get("selection") or {}
    want_gt, want_syn = selection.get("gt_md5"), selection.get("synonyms_md5")
    candidates: list[tuple[Path | None, Path | None]] = [(None, None)]
    try:
        config = report.load_run(captions.resolve().parent)["details"]["config"]
        candidates.append((Path(config["gt_source"]), Path(config.get("synonyms_source") or "-")))
    except (EvalInputError, KeyError, TypeError):
        pass
    if builtin.is_builtin(str(saved["settings"].get("model", ""))):
        split = builtin.split()
        candidates.append((split.gt_objects, split.synonyms))
    gt_path = syn_path = None
    found_gt = found_syn = False
    for gt_file, syn_file in candidates:
        if not found_gt and (gt_file is None or gt_file.is_file()) and chair.load_gt(gt_file).md5 == want_gt:
            gt_path, found_gt = gt_file, True
        if not found_syn and (syn_file is None or syn_file.is_file()):
            md5 = chair.load_vocabulary(syn_file).md5
            if md5 == want_syn or (want_syn is None and syn_file is None):
                syn_path, found_syn = syn_file, True
    if not (found_gt and found_syn):
        raise EvalInputError(
            f"{captions} is a steer eval run's file, scored against ground truth md5 {want_gt}"
            + (f" and synonyms md5 {want_syn}" if want_syn else "")
            + ", which cannot be found; give --gt-objects FILE and --synonyms FILE"
        )
    return gt_path, syn_path


@chair_app.command("score")
def chair_score(
    captions: Path = typer.Option(
        ..., "--captions", help="Captions, JSONL or JSON array of {image_id, caption}."
    ),
    gt_objects: Path | None = typer.Option(
        None,
        "--gt-objects",
        help="Ground truth: a map {image_id: [objects]} (.json or .json.gz) or a COCO instances/captions "
        "JSON. Default: the shipped COCO-2014 map, or the ground truth of the steer eval run the captions "
        "come from.",
    ),
    coco_annotations: Path | None = typer.Option(
        None,
        "--coco-annotations",
        help="Folder with instances_*2014.json / captions_*2014.json (or one such file) to build GT from.",
    ),
    synonyms: Path | None = typer.Option(
        None,
        "--synonyms",
        help="CHAIR synonym table (default: COCO's; beside a built-in split's ground truth: that split's).",
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
    """Score captions: CHAIR_s, CHAIR_i, Recall, Len, Precision, F1 (percent, one decimal) with bootstrap 95%
    intervals over images. Rules: docs/chair.md."""
    notes: list[str] = []
    with _clean_errors():
        check_choice(duplicates, chair.DUPLICATES, "--duplicates")
        check_choice(missing_gt, chair.MISSING_GT, "--missing-gt")
        check_choice(lineage, chair.LINEAGES, "--lineage")
        if gt_objects is not None and coco_annotations is not None:
            raise EvalInputError("give either --gt-objects or --coco-annotations, not both")
        _require_file(captions, "captions file")
        if synonyms is not None:
            _require_file(synonyms, "synonyms file")
        items = chair.load_captions(captions, image_key=image_key, caption_key=caption_key)
        if gt_objects is None and coco_annotations is None:
            found = _run_files(captions)
            if found is not None:
                gt_objects = found[0]
                if synonyms is None:
                    synonyms = found[1]
                notes.append(f"ground truth and synonyms of the steer eval run {captions.resolve().parent}")
        if gt_objects is not None:
            _require_file(gt_objects, "ground-truth file")
            if synonyms is None:
                synonyms = _builtin_synonyms(gt_objects)
                if synonyms is not None:
                    notes.append(f"built-in split: its synonym table {synonyms}")
        vocabulary = chair.load_vocabulary(synonyms)
        if coco_annotations is not None:
            gt = chair.build_gt_from_coco(
                coco_annotations, image_ids={c["image_id"] for c in items}, vocabulary=vocabulary
            )
        else:
            gt = chair.load_gt(gt_objects)
        result = chair.score_captions(
            items,
            gt,
            vocabulary=vocabulary,
            lineage=lineage,
            duplicates=duplicates,
            truncate_incomplete=truncate_incomplete,
            missing_gt=missing_gt,
        )
        units = bootstrap.chair_units(result["captions"])
        ci = bootstrap.intervals(units)
        records_path = _records_path(captions, out, "chair")
        summary = {
            "config": {**result["config"], "captions_file": str(captions)},
            "overall": result["overall"],
            "metrics": chair_metrics(result["overall"]),
            "intervals": ci,
            "bootstrap": bootstrap.describe(len(units)),
        }
        summary_path = _write(result["captions"], summary, records_path)
    overall, counts = result["overall"], result["overall"]["counts"]
    shown = chair_metrics(overall)
    if as_json:
        payload: dict[str, Any] = dict(shown)
        payload.update({f"{name}_ci95": ci[name] for name in shown})
        payload.update(counts)
        _echo_json(payload)
    else:
        fractions = {
            "CHAIR_s": f"{counts['hallucinated_captions']}/{counts['captions']}",
            "CHAIR_i": f"{counts['hallucinated_mentions']}/{counts['mentions']}",
            "Recall": f"{counts['recalled']}/{counts['gt_objects']}",
            "Len": f"{counts['tokens']} tokens",
        }
        rows = [
            (
                f"{name} {direction(name)}".strip(),
                f"{value:.1f}  {_interval_text(ci.get(name), 1)}"
                + (f"  ({fractions[name]})" if name in fractions else ""),
            )
            for name, value in shown.items()
        ]
        config = result["config"]
        _show(
            f"CHAIR ({config['lineage']} lineage) - {captions.name}",
            rows,
            [
                f"ground truth: {config['gt_source']} (md5 {config['gt_md5']}); synonyms: "
                f"{config['synonyms_source']} (md5 {config['synonyms_md5']})",
                "[value] [95% bootstrap interval over images]",
            ],
        )
    for note in notes:
        typer.echo(f"note: {note}", err=True)
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
    """Score yes/no answers: Accuracy, Precision, Recall, F1, Yes-ratio, Off-format (percent, two decimals)
    with bootstrap 95% intervals over images. Rules: docs/pope.md."""
    with _clean_errors():
        check_choice(parser, pope.PARSERS, "--parser")
        _require_file(answers, "answers file")
        _require_file(questions, "questions file")
        qset = pope.load_questions(questions)
        result = pope.score_answers(
            pope.load_answers(answers), qset, parser=parser, allow_missing=allow_missing
        )
        split = qset.split or "questions"
        units = bootstrap.pope_units(({**r, "split": split} for r in result["records"]), [split])
        ci = bootstrap.intervals(units)
        records_path = _records_path(answers, out, "pope")
        summary = {
            "config": {**result["config"], "answers_file": str(answers)},
            "metrics": result["metrics"],
            "intervals": ci,
            "bootstrap": bootstrap.describe(len(units)),
            "missing": result["missing"],
        }
        summary_path = _write(result["records"], summary, records_path)
    m = result["metrics"]
    shown = pope_metrics(m)
    counts = ("tp", "fp", "tn", "fn", "n", "unknown", "missing")
    if as_json:
        payload: dict[str, Any] = dict(shown)
        payload.update({f"{name}_ci95": ci[name] for name in POPE_METRICS})
        payload.update({key: m[key] for key in counts})
        _echo_json(payload)
    else:
        rows = [
            (f"{name} {direction(name)}".strip(), f"{shown[name]:.2f}  {_interval_text(ci.get(name), 2)}")
            for name in POPE_METRICS
        ]
        rows += [(key, str(m[key])) for key in ("n", "tp", "fp", "tn", "fn", "unknown", "missing")]
        cfg = result["config"]
        notes = [
            f"questions: {cfg['questions']} (split {cfg['split']}, version {cfg['version']}, md5 {cfg['questions_md5']})",
            "[value] [95% bootstrap interval over images]",
        ]
        notes += report.off_format_notes(
            {name: 100 * m[key] for name, key in POPE_SCORER_KEYS.items()}, result["records"]
        )
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


# --------------------------------------------------------------------------------------------------
# steer eval: generation + scoring in one run (steer.evals.run)
# --------------------------------------------------------------------------------------------------

eval_app = typer.Typer(
    help="Generate with a (steered) model and score CHAIR or POPE in one resumable run.", no_args_is_help=True
)


@eval_app.callback()
def _eval_group() -> None:
    """Generation + scoring: `steer eval chair|pope --model M --images DIR --out RUN`, `steer eval compare`."""


@contextmanager
def _eval_errors(out: Path | None = None) -> Iterator[None]:
    """Input and steer errors: one stderr line, exit 2. Ctrl-C: say what is saved and how to resume, exit 130."""
    try:
        with _clean_errors():
            yield
    except SteerError as err:
        raise _fail(str(err)) from None
    except KeyboardInterrupt:
        where = f" in {out}" if out is not None else ""
        typer.echo(
            f"interrupted: every finished sample is saved{where}; run the same command again to resume",
            err=True,
        )
        raise typer.Exit(code=130) from None


def _expand_splits(splits: list[str]) -> list[str]:
    out: list[str] = []
    for split in splits:
        out += list(pope.SPLITS) if split == "all" else [s.strip() for s in split.split(",") if s.strip()]
    return list(dict.fromkeys(out))


BuildTask = Callable[[RunOptions, Bench | None], Task]
"""Makes the task once the defaults are filled in: ``build(options, bench)`` (``bench``: ``None``, or a function
giving the built-in split, see `RunOptions.with_defaults`)."""


def _run_eval(
    task_name: str,
    options: RunOptions,
    build: BuildTask,
    prompt: str,
    prepare: Callable[[RunOptions], RunOptions] | None = None,
) -> None:
    """Shared body of ``steer eval chair`` and ``steer eval pope``: ``prompt`` is the user text (template)
    recorded in the settings; ``prepare`` adjusts the options first (inside the error handling)."""
    out = options.out
    with _eval_errors(out):
        if prepare is not None:
            options = prepare(options)
        options, bench = options.with_defaults(task_name)
        options.check()
        task = build(options, bench)
        rank, world_size, state = distributed_context()
        device_map = process_device_map(options.device_map, world_size, state)
        settings = options.settings(task_name, task.selection, prompt, device_map)
        if out is None:
            out = default_out(settings)
            typer.echo(f"run folder: {out}", err=True)
        payload = run_eval(
            task,
            settings,
            out,
            session_loader(settings, out, device_map=device_map, write=rank == 0),
            retry_errors=options.retry_errors,
            progress=options.progress,
            rank=rank,
            world_size=world_size,
            state=state,
        )
    if payload is None:  # not process 0: process 0 reports
        return
    gen = payload.get("generation") or {}
    if gen.get("generated") or gen.get("errors"):
        typer.echo(
            f"generated {gen['generated']} samples ({gen['errors']} errors) in {gen['seconds']:.1f} s"
            + (f", {gen['samples_per_second']} samples/s" if gen.get("samples_per_second") else "")
            + (f" on process 0 of {gen['world_size']}" if gen.get("world_size", 1) > 1 else ""),
            err=True,
        )
    elif gen:
        typer.echo("nothing left to generate: every sample was already on disk; scored again", err=True)
    decimals = 1 if task_name == "chair" else 2
    intervals = payload.get("intervals") or {}
    rows = [
        (f"{k} {direction(k)}".strip(), f"{v}  {_interval_text(intervals.get(k), decimals)}")
        for k, v in payload["metrics"].items()
    ]
    samples = payload["samples"]
    notes = [
        f"{samples['scored']} of {samples['total']} samples scored, {samples['errors']} errors; "
        "[95% bootstrap interval over images]"
    ]
    _show(f"steer eval {task_name} - {payload['method']}", rows, notes)
    typer.echo(
        f"samples: {out / journal.SAMPLES_FILE}; metrics: {out / report.METRICS_FILE}; "
        f"report: {out / report.REPORT_FILE}, {out / html_report.HTML_FILE}",
        err=True,
    )


_MODEL = typer.Option(
    ...,
    "--model",
    help="Model folder (a steer.zoo folder or a checkpoint), hub id, or builtin:demo (the shipped demo model "
    "on the built-in SynthScenes benchmark, offline).",
)
_METHOD = typer.Option([], "--method", "-m", help="steer method to apply (repeatable; see `steer methods`).")
_PARAM = typer.Option(
    [], "--param", "-p", help="Method parameter NAME=VALUE or METHOD.NAME=VALUE (JSON value)."
)
_RECIPE = typer.Option(
    None, "--recipe", help="Recipe, e.g. llava-1.5/var (or var: the model's family is used)."
)
_FORCE_RECIPE = typer.Option(
    False,
    "--force-recipe",
    help="Apply --recipe even when it was written for another model family (its settings may not transfer).",
)
_IMAGES = typer.Option(
    None,
    "--images",
    help="Folder with the COCO val2014 images (COCO_val2014_*.jpg), or a Hugging Face dataset with an image "
    "column (save_to_disk folder or .parquet); default with builtin:demo: the built-in split.",
)
_NUM_IMAGES = typer.Option(500, "--num-images", help="Number of images to evaluate.")
_BATCH = typer.Option(
    None, "--batch-size", help="Samples per generate call, left padded (default 1; builtin:demo 16)."
)
_OUT = typer.Option(
    None,
    "--out",
    help="Run folder: samples.jsonl, settings.json, metrics.json, report.md "
    "(default: runs/<task>-<model>-<methods>-<settings hash>).",
)
_DTYPE = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16.")
_DEVICE_MAP = typer.Option(
    None, "--device-map", help="from_pretrained device_map (default: auto on CUDA, else CPU)."
)
_4BIT = typer.Option(False, "--load-in-4bit", help="4-bit weights via bitsandbytes.")
_8BIT = typer.Option(False, "--load-in-8bit", help="8-bit weights via bitsandbytes.")
_ATTN = typer.Option(None, "--attn-implementation", help="sdpa (default), eager, flash_attention_2, ...")
_TEMPLATE = typer.Option(
    "auto", "--template", help="auto, llava_v1, chat (processor chat template) or plain."
)
_BEAMS = typer.Option(1, "--num-beams", help="Beam count (1 = greedy).")
_SAMPLE = typer.Option(
    False, "--do-sample", help="Sample instead of greedy/beam decoding (seeded by --seed)."
)
_TEMPERATURE = typer.Option(
    None, "--temperature", help="Sampling temperature (with --do-sample; default 1.0)."
)
_TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling mass (with --do-sample; default 1.0).")
_SEED = typer.Option(
    0, "--seed", help="Seed of every batch (derived from it and the batch's first sample); part of the run."
)
_RETRY = typer.Option(
    False, "--retry-errors", help="On resume, generate again the samples recorded as errors."
)
_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (throughput, ETA).")


@eval_app.command("chair")
def eval_chair(
    model: str = _MODEL,
    method: list[str] = _METHOD,
    param: list[str] = _PARAM,
    recipe: str | None = _RECIPE,
    force_recipe: bool = _FORCE_RECIPE,
    images: Path | None = _IMAGES,
    num_images: int = _NUM_IMAGES,
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="New tokens per caption (default 512 long; 64 short and builtin:demo)."
    ),
    batch_size: int | None = _BATCH,
    out: Path | None = _OUT,
    dtype: str = _DTYPE,
    device_map: str | None = _DEVICE_MAP,
    load_in_4bit: bool = _4BIT,
    load_in_8bit: bool = _8BIT,
    attn_implementation: str | None = _ATTN,
    template: str = _TEMPLATE,
    num_beams: int = _BEAMS,
    do_sample: bool = _SAMPLE,
    temperature: float | None = _TEMPERATURE,
    top_p: float | None = _TOP_P,
    seed: int = _SEED,
    retry_errors: bool = _RETRY,
    progress: bool = _PROGRESS,
    image_ids: Path | None = typer.Option(
        None,
        "--image-ids",
        help="File of image ids to caption (default: OPERA-500 when all present, else sorted).",
    ),
    prompt: str = typer.Option(
        CHAIR_PROMPT, "--prompt", help="The user text (spec: CHAIR's standard prompt)."
    ),
    gt_objects: Path | None = typer.Option(
        None,
        "--gt-objects",
        help="Ground truth: a map {image_id: [objects]} or a COCO instances JSON (default: shipped COCO map; "
        "builtin:demo: its split's).",
    ),
    synonyms: Path | None = typer.Option(
        None,
        "--synonyms",
        help="CHAIR synonym table (default: COCO's; builtin:demo: the scene vocabulary's).",
    ),
    lineage: str = typer.Option("original", "--lineage", help="original or opera."),
    truncate_incomplete: bool = typer.Option(
        False, help="Cut captions not ending in .!? after their last '.'."
    ),
) -> None:
    """Caption COCO images and score CHAIR_s / CHAIR_i / Recall / Len / Precision / F1 with 95% intervals;
    resumable (same command, same --out). Protocol and rules: docs/chair.md."""
    options = RunOptions.from_values(locals())

    def build(options: RunOptions, bench: Bench | None) -> Task:
        return chair_task(
            options.images_dir,
            num_images=options.num_images,
            image_ids=image_ids,
            gt_objects=gt_objects or (bench().gt_objects if bench is not None else None),
            prompt=prompt,
            lineage=lineage,
            truncate_incomplete=truncate_incomplete,
            synonyms=synonyms
            or (_builtin_synonyms(gt_objects) if gt_objects is not None and gt_objects.is_file() else None)
            or (bench().synonyms if bench is not None else None),
        )

    _run_eval("chair", options, build, prompt)


@eval_app.command("pope")
def eval_pope(
    model: str = _MODEL,
    method: list[str] = _METHOD,
    param: list[str] = _PARAM,
    recipe: str | None = _RECIPE,
    force_recipe: bool = _FORCE_RECIPE,
    images: Path | None = _IMAGES,
    split: list[str] = typer.Option(
        [],
        "--split",
        help="random, popular, adversarial (repeatable) or all (default: random; builtin:demo: all).",
    ),
    num_images: int = _NUM_IMAGES,
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="New tokens per answer (default 128 as LLaVA; builtin:demo 16)."
    ),
    batch_size: int | None = _BATCH,
    out: Path | None = _OUT,
    dtype: str = _DTYPE,
    device_map: str | None = _DEVICE_MAP,
    load_in_4bit: bool = _4BIT,
    load_in_8bit: bool = _8BIT,
    attn_implementation: str | None = _ATTN,
    template: str = _TEMPLATE,
    num_beams: int = _BEAMS,
    do_sample: bool = _SAMPLE,
    temperature: float | None = _TEMPERATURE,
    top_p: float | None = _TOP_P,
    seed: int = _SEED,
    retry_errors: bool = _RETRY,
    progress: bool = _PROGRESS,
    questions: Path | None = typer.Option(
        None,
        "--questions",
        help="POPE question file (one --split), or a Hugging Face dataset of questions (question, answer, image "
        "or its file name, optional category column as lmms-lab/POPE; save_to_disk folder or .parquet): its "
        "images are used when --images is not given.",
    ),
    questions_dir: Path | None = typer.Option(
        None,
        "--questions-dir",
        help="Folder with coco_pope_<split>[_2023-08].json (default: $STEER_POPE_DIR).",
    ),
    pope_version: str = typer.Option(
        "2023-08", "--pope-version", help="2023-08 (LLaVA-1.5 anchors) or current."
    ),
    prompt: str = typer.Option("llava", "--prompt", help="llava, vcd or raw (docs/pope.md)."),
    parser: str = typer.Option("official", "--parser", help="official, opera or strict."),
) -> None:
    """Ask POPE yes/no questions and score Accuracy / Precision / Recall / F1 / Yes-ratio / Off-format with 95%
    intervals; resumable. Protocol and rules: docs/pope.md."""
    options = RunOptions.from_values(locals())

    def prepare(options: RunOptions) -> RunOptions:
        if options.images is None and questions is not None and formats.has_image_column(questions):
            return dataclasses.replace(options, images=questions)  # the questions' own images
        return options

    def build(options: RunOptions, bench: Bench | None) -> Task:
        splits = _expand_splits(split or (["all"] if bench is not None else ["random"]))
        question_files = None
        question_file = questions
        if bench is not None and questions is None and questions_dir is None:  # the built-in split's own
            question_files = {s: bench().pope_questions(s) for s in pope.SPLITS}
        elif formats.is_dataset(questions):
            assert questions is not None
            question_files, question_file = formats.pope_question_files(questions, splits), None
        return pope_task(
            options.images_dir,
            splits=splits,
            question_files=question_files,
            questions=question_file,
            questions_dir=questions_dir,
            version=pope_version,
            num_images=options.num_images,
            prompt=prompt,
            parser=parser,
        )

    _run_eval("pope", options, build, POPE_PROMPTS.get(prompt, prompt), prepare)


@eval_app.command("compare")
def eval_compare(
    runs: list[Path] = typer.Argument(
        ...,
        help="Run folders (finished: with metrics.json) of one task on the same data; Δ against the first.",
    ),
    fmt: str = typer.Option("text", "--format", help="text (fits 80 columns), md, csv or json."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also draw a bar chart of the metrics with their intervals (.png)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Compare runs of different data anyway (with a warning)."
    ),
) -> None:
    """Metric rows by run columns: each value with its bootstrap 95% interval, each Δ against run 1 with the
    interval of a paired bootstrap (~ marks a Δ whose interval contains 0); ↓/↑ per metric."""
    with _clean_errors():
        check_choice("json" if as_json else fmt, compare.FORMATS, "--format")
        data = compare.compare_data(runs, force=force)
        text = compare.format_compare(data, "json" if as_json else fmt)
        if plot is not None:
            from steer.evals import plots

            drawn = plots.metric_bars(data, plot)
    for warning in data["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    sys.stdout.write(text)
    sys.stdout.flush()
    if plot is not None:
        typer.echo(f"chart: {drawn}", err=True)


# --------------------------------------------------------------------------------------------------
# steer show: one picture of what a method did (steer.evals.show), mounted on the top-level app
# --------------------------------------------------------------------------------------------------


def show_command(
    model: str = typer.Option(..., "--model", help="Model folder, hub id or builtin:demo."),
    image: Path = typer.Option(..., "--image", help="The input image."),
    method: str = typer.Option(..., "--method", "-m", help="fastervlm, vhr, cca, vista or var."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter NAME=VALUE (JSON value)."),
    prompt: str | None = typer.Option(None, "--prompt", help="User text (default: the CHAIR prompt)."),
    out: Path | None = typer.Option(None, "--out", help="PNG to write (default: show-<method>.png)."),
    max_new_tokens: int = typer.Option(
        16, "--max-new-tokens", help="Tokens generated without and with the method."
    ),
) -> None:
    """One picture of what a method did on one image, drawn from its Steering.state: kept tokens (fastervlm),
    chosen heads (vhr), concentric positions (cca), steering-vector norms (vista), visual sinks (var)."""
    from steer.evals.options import method_params
    from steer.evals.show import show

    target = out or Path(f"show-{method}.png")
    with _eval_errors():
        if max_new_tokens < 1:
            raise EvalInputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        shown = show(
            model,
            image,
            method,
            params=method_params(param, [method]).get(method, method_params(param, [])),
            prompt=prompt,
            out=target,
            max_new_tokens=max_new_tokens,
        )
    typer.echo(f"without {method}: {shown.answers['without']!r}")
    typer.echo(f"with {method}:    {shown.answers['with']!r}")
    typer.echo(f"picture: {shown.path} ({shown.picture.width}x{shown.picture.height})", err=True)
