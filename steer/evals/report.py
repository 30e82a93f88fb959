"""Run outputs of ``steer eval``: ``metrics.json``, ``per_image.json`` and ``report.md``.

``metrics.json``::

    {"task": "chair" | "pope", "run_dir", "settings": {...}, "settings_hash", "resolved": {...},
     "samples": {"total", "scored", "errors"},
     "metrics": {"CHAIR_s", "CHAIR_i", "Recall", "Len", "Precision", "F1"}          # CHAIR, percent (Len: tokens)
              | {"Accuracy", "Precision", "Recall", "F1", "Yes-ratio", "Off-format"}  # POPE, one split, percent
              | {"F1 (mean)", "Accuracy (mean)", "<metric> (<split>)", ...},          # POPE, several splits
     "intervals": {metric: [lo, hi]},      # bootstrap 95% over images (steer.evals.bootstrap)
     "bootstrap": {...how the intervals were computed...},
     "provenance": {...versions, git commit, device, dtype, model files and hash, seed, decoding, methods...},
     "details": {...the scorer's config, fractions and raw counts...},
     "generation": {...what the last invocation generated, its time and throughput...},
     "steer_version"}

``per_image.json`` holds the per-image counts behind the metrics (what `steer eval compare` resamples for the
interval of a difference). ``report.md`` holds the settings, the metrics with their intervals, the provenance,
the published anchors for the same model (LLaVA-1.5-7B baselines, ``docs/chair.md`` and ``docs/pope.md``),
examples of hallucinated objects and the errors; ``report.html`` (`steer.evals.html`) the same with pictures.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals import bootstrap
from steer.evals.metrics import canonical_metrics, direction
from steer.evals.provenance import provenance
from steer.evals.settings import EvalSettings, write_json_atomic

__all__ = [
    "ANCHORS",
    "METRICS_FILE",
    "PER_IMAGE_FILE",
    "REPORT_FILE",
    "anchors_for",
    "load_run",
    "load_units",
    "metrics_payload",
    "off_format_notes",
    "write_metrics",
    "write_report",
    "write_units",
]

METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.json"
REPORT_FILE = "report.md"

_POPE_RANDOM_2023_08 = {
    "Accuracy": 88.04,
    "Precision": 97.45,
    "Recall": 78.87,
    "F1": 87.18,
    "Yes-ratio": 41.72,
}
ANCHORS: list[dict[str, Any]] = [
    {
        "model": "LLaVA-1.5-7B",
        "task": "chair",
        "metrics": {"CHAIR_s": 45.0, "CHAIR_i": 12.8, "Recall": 79.8, "Len": 96.9},
        "protocol": {
            "selection.source": "opera500",
            "max_new_tokens": 512,
            "num_beams": 1,
            "template": "llava_v1",
        },
        "description": "OPERA-500 COCO val2014 images, 'Please describe this image in detail.', greedy, "
        "512 new tokens, original CHAIR lineage (OPERA log; exact counts 225/500, 478/3739, 1216/1524)",
        "source": "docs/chair.md, Anchor",
    },
    {
        "model": "LLaVA-1.5-7B",
        "task": "pope",
        "split": "random",
        "metrics": _POPE_RANDOM_2023_08,
        "protocol": {
            "version.random": "2023-08",
            "prompt_name": "llava",
            "num_beams": 1,
            "template": "llava_v1",
        },
        "description": "2023-08 random file (2910 questions), LLaVA prompt in vicuna_v1, greedy, official parser "
        "(TP 1183, FP 31, TN 1379, FN 317)",
        "source": "docs/pope.md, Anchors (LLaVA issue #626)",
    },
    {
        "model": "LLaVA-1.5-7B",
        "task": "pope",
        "split": "popular",
        "metrics": {"F1": 86.29, "Recall": 78.87, "Accuracy": 87.5, "Precision": 95.3, "Yes-ratio": 41.4},
        "protocol": {
            "version.popular": "2023-08",
            "prompt_name": "llava",
            "num_beams": 1,
            "template": "llava_v1",
        },
        "description": "2023-08 popular file, same protocol; values other than F1 and Recall are approximate",
        "source": "docs/pope.md, Anchors",
    },
    {
        "model": "LLaVA-1.5-7B",
        "task": "pope",
        "split": "adversarial",
        "metrics": {"F1": 84.50, "Recall": 78.87, "Accuracy": 85.5, "Precision": 91.0, "Yes-ratio": 43.3},
        "protocol": {
            "version.adversarial": "2023-08",
            "prompt_name": "llava",
            "num_beams": 1,
            "template": "llava_v1",
        },
        "description": "2023-08 adversarial file, same protocol; values other than F1 and Recall are approximate",
        "source": "docs/pope.md, Anchors",
    },
]
"""Published baselines from the specs, with the protocol conditions a run must meet to be comparable."""

_POPE_MEAN_F1_ANCHOR = 85.99


# --------------------------------------------------------------------------------------------------
# metrics.json
# --------------------------------------------------------------------------------------------------


def metrics_payload(
    *,
    task: str,
    run_dir: Path,
    settings: EvalSettings,
    resolved: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Any],
    stats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``metrics.json`` (see the module docstring)."""
    import steer

    errors = sum(1 for r in records if r.get("error"))
    settings_dict = settings.to_dict()
    units = scores.get("units")
    generation = None
    if stats is not None:
        seconds = float(stats.get("seconds") or 0.0)
        done = int(stats.get("generated", 0)) + int(stats.get("errors", 0))
        generation = {**stats, "samples_per_second": round(done / seconds, 3) if seconds > 0 else None}
    return {
        "task": task,
        "run_dir": str(run_dir),
        "settings": settings_dict,
        "settings_hash": settings.stable_hash(),
        "method": settings.method_label,
        "resolved": dict(resolved),
        "samples": {"total": len(records), "scored": len(records) - errors, "errors": errors},
        "metrics": dict(scores["metrics"]),
        "intervals": dict(scores.get("intervals") or {}),
        "bootstrap": bootstrap.describe(len(units)) if units is not None else None,
        "provenance": provenance(settings_dict, resolved),
        "details": scores["details"],
        "generation": generation,
        "steer_version": getattr(steer, "__version__", None),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_metrics(run_dir: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``RUN_DIR/metrics.json`` atomically; return its path."""
    path = Path(run_dir) / METRICS_FILE
    write_json_atomic(path, payload)
    return path


def write_units(run_dir: Path, units: bootstrap.Units) -> Path:
    """Write ``RUN_DIR/per_image.json`` (the per-image counts behind the metrics); return its path."""
    path = Path(run_dir) / PER_IMAGE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(units.to_json(), separators=(",", ":")) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load_units(run_dir: Path) -> bootstrap.Units | None:
    """The per-image counts of a run (``None`` for runs written before ``per_image.json`` existed)."""
    path = Path(run_dir) / PER_IMAGE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalInputError(f"{path}: unreadable ({err})") from None
    try:
        return bootstrap.Units.from_json(data)
    except EvalInputError as err:
        raise EvalInputError(f"{path}: {err}") from None


def load_run(run_dir: Path) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run (metric names of older runs made canonical).

    Raises:
        EvalInputError: no such folder, or no (readable) ``metrics.json`` in it (the run is unfinished).
    """
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise EvalInputError(f"run folder not found: {run_dir}")
    if not path.is_file():
        raise EvalInputError(
            f"{run_dir} has no {METRICS_FILE}: the run has not finished (re-run it to resume)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EvalInputError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict) or "metrics" not in data or "settings" not in data:
        raise EvalInputError(f"{path}: not a steer eval metrics file")
    data["metrics"] = canonical_metrics(data["metrics"])
    data["intervals"] = canonical_metrics(data.get("intervals") or {})
    return data


# --------------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------------


def _model_name(payload: Mapping[str, Any]) -> str | None:
    """``LLaVA-1.5-7B`` when the run's model is (by name or by shape) LLaVA-1.5-7B, else ``None``."""
    name = str(payload["settings"].get("model", "")).lower().replace("_", "-")
    resolved = payload.get("resolved") or {}
    if "llava-1.5-7b" in name or "llava-v1.5-7b" in name:
        return "LLaVA-1.5-7B"
    if (
        resolved.get("model_type") == "llava"
        and resolved.get("text_hidden_size") == 4096
        and resolved.get("text_layers") == 32
    ):
        return "LLaVA-1.5-7B"
    return None


def _lookup(settings: Mapping[str, Any], resolved: Mapping[str, Any], key: str) -> Any:
    if key == "template":
        return resolved.get("template", settings.get("template"))
    if key in settings:
        return settings[key]
    value: Any = settings.get("selection", {})
    for part in key.removeprefix("selection.").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def anchors_for(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The anchors of the specs for this run's model and task, each with ``mismatches`` (protocol conditions
    the run does not meet) and ``keys`` (the run's metric names for the anchor's metrics)."""
    model = _model_name(payload)
    if model is None:
        return []
    settings, resolved = payload["settings"], payload.get("resolved") or {}
    splits = (settings.get("selection") or {}).get("splits") or []
    out = []
    for anchor in ANCHORS:
        if anchor["model"] != model or anchor["task"] != payload["task"]:
            continue
        if anchor["task"] == "pope" and anchor["split"] not in splits:
            continue
        mismatches = []
        for key, want in anchor["protocol"].items():
            got = _lookup(settings, resolved, key)
            if got != want:
                mismatches.append(f"{key} {got!r} (anchor {want!r})")
        if settings.get("methods") or settings.get("recipe"):
            mismatches.append(f"steered ({payload.get('method')}); the anchor is the unsteered baseline")
        if anchor["task"] == "pope" and len(splits) > 1:
            keys = {m: f"{m} ({anchor['split']})" for m in anchor["metrics"]}
        else:
            keys = {m: m for m in anchor["metrics"]}
        out.append({**anchor, "mismatches": mismatches, "keys": keys})
    return out


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|").replace("\n", "\\n")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fmt(value: Any) -> str:
    return str(round(value, 2)) if isinstance(value, float) else str(value)


def _chair_examples(scored: Sequence[Mapping[str, Any]], limit: int = 5) -> list[str]:
    counts: Counter[str] = Counter(h["node"] for rec in scored for h in rec["hallucinated"])
    lines = ["## Hallucinated objects", ""]
    if not counts:
        return [*lines, "No hallucinated object mentions.", ""]
    lines += ["Most frequent (node word: mentions):", ""]
    lines += _table(["object", "mentions"], counts.most_common(15))
    lines += ["", f"Examples (up to {limit} captions with hallucinations; hallucinated words in bold):", ""]
    shown = 0
    for rec in scored:
        if not rec["hallucinated"] or shown >= limit:
            continue
        words = sorted({h["word"] for h in rec["hallucinated"]})
        nodes = sorted({h["node"] for h in rec["hallucinated"]})
        caption = rec["caption"]
        for word in words:
            caption = re.sub(rf"\b({re.escape(word)}(?:s|es)?)\b", r"**\1**", caption, flags=re.IGNORECASE)
        text = caption if len(caption) <= 600 else caption[:600] + " ..."
        lines += [
            f"- image {rec['image_id']}: hallucinated {', '.join(nodes)} (ground truth: {', '.join(rec['gt']) or 'none'})",
            f"  > {text.replace(chr(10), ' ')}",
        ]
        shown += 1
    return [*lines, ""]


def _pope_examples(scored: Sequence[Mapping[str, Any]], limit: int = 5) -> list[str]:
    lines = ["## Hallucinated objects", ""]
    fp = [r for r in scored if r["label"] == "no" and r["prediction"] == "yes"]
    fn = [r for r in scored if r["label"] == "yes" and r["prediction"] != "yes"]
    lines.append(f"False positives (said yes to an absent object): {len(fp)}; missed objects: {len(fn)}.")
    lines.append("")
    if fp:
        lines += _table(
            ["split", "question_id", "image", "question", "answer"],
            [(r["split"], r["question_id"], r["image"], r["text"], r["answer"]) for r in fp[:limit]],
        )
        lines.append("")
    if fn:
        lines += ["Missed (said no to a present object):", ""]
        lines += _table(
            ["split", "question_id", "image", "question", "answer"],
            [(r["split"], r["question_id"], r["image"], r["text"], r["answer"]) for r in fn[:limit]],
        )
        lines.append("")
    return lines


def _anchor_lines(payload: Mapping[str, Any]) -> list[str]:
    lines = ["## Anchors (published numbers for the same model, from the specs)", ""]
    anchors = anchors_for(payload)
    if not anchors:
        return [
            *lines,
            "No anchor in the specs for this model (anchors exist for LLaVA-1.5-7B baselines).",
            "",
        ]
    metrics = payload["metrics"]
    for anchor in anchors:
        title = anchor["model"] + (f", POPE {anchor['split']}" if anchor["task"] == "pope" else ", CHAIR")
        lines += [f"**{title}**: {anchor['description']} ({anchor['source']}).", ""]
        rows = []
        for name, value in anchor["metrics"].items():
            key = anchor["keys"][name]
            got = metrics.get(key)
            delta = "" if got is None else f"{got - value:+.2f}"
            rows.append((name, _fmt(value), "" if got is None else _fmt(got), delta))
        lines += _table(["metric", "anchor", "this run", "Δ"], rows)
        lines.append("")
        if anchor["mismatches"]:
            lines += [
                "Not comparable as is; this run differs in: " + "; ".join(anchor["mismatches"]) + ".",
                "",
            ]
    if payload["task"] == "pope" and len(anchors) == 3 and "F1 (mean)" in metrics:
        lines += [
            f"Mean F1 anchor {_POPE_MEAN_F1_ANCHOR} (LLaVA-1.5 paper: 85.9); this run {metrics['F1 (mean)']}.",
            "",
        ]
    return lines


def off_format_notes(
    metrics: Mapping[str, Any], scored: Sequence[Mapping[str, Any]], suffix: str = ""
) -> list[str]:
    """Why a POPE run has off-format answers, in words (empty when it has none).

    ``metrics`` holds ``Off-format{suffix}`` and ``Yes-ratio{suffix}`` in percent; ``scored`` the scored
    records. When every yes is an off-format answer (the off-format rate equals the yes-ratio, e.g. a model
    that answers ``"moon yes"``), the parser read those answers as yes: the numbers are right for the parser,
    the answers are just not in the yes/no form.
    """
    off, yes = metrics.get(f"Off-format{suffix}"), metrics.get(f"Yes-ratio{suffix}")
    if not off:
        return []
    examples = list(dict.fromkeys(r["answer"] for r in scored if r.get("off_format")))[:3]
    shown = ", ".join(repr(a) for a in examples)
    off_yes = sum(1 for r in scored if r.get("off_format") and r.get("prediction") == "yes")
    n_off = sum(1 for r in scored if r.get("off_format"))
    if yes is not None and abs(float(off) - float(yes)) < 0.01 and n_off and off_yes == n_off:
        return [
            f"Off-format{suffix} {off} equals the yes-ratio: every answer read as yes is off-format "
            f"(e.g. {shown}). The model answers yes in its own words; the parser reads an answer without "
            "'no'/'not' as yes, so the metrics stand, but an exact-match parser (--parser strict) would "
            "count these as unknown."
        ]
    return [
        f"Off-format{suffix} {off}: answers that are not a bare yes/no (e.g. {shown}); the parser decided them "
        "(yes unless they say no/not)."
    ]


def _metric_rows(payload: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    intervals = payload.get("intervals") or {}
    rows = []
    for name, value in payload["metrics"].items():
        interval = intervals.get(name)
        rows.append(
            (
                f"{name} {direction(name)}".strip(),
                _fmt(value),
                f"[{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "",
            )
        )
    return rows


def _provenance_lines(payload: Mapping[str, Any]) -> list[str]:
    prov = payload.get("provenance")
    if not prov:
        return []
    model = prov.get("model") or {}
    weights = model.get("weights") or {}
    git = prov.get("git") or {}
    rows: list[tuple[str, Any]] = [
        ("versions", ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items() if v)),
        ("python / platform", f"{prov.get('python')} / {prov.get('platform')}"),
        (
            "git commit",
            (git.get("commit", "") + (" (dirty)" if git.get("dirty") else "")) if git else "not a checkout",
        ),
        ("device / dtype", f"{prov.get('device')} / {prov.get('dtype')}"),
        ("quantization / attention", f"{prov.get('quantization')} / {prov.get('attn_implementation')}"),
        ("model", f"{model.get('name')} ({model.get('source')})"),
        ("model files", model.get("path")),
        ("revision", model.get("revision")),
        ("weights sha256", weights.get("sha256")),
        ("seed", prov.get("seed")),
        (
            "decoding",
            (prov.get("generation") or {}).get("effective") or (prov.get("generation") or {}).get("kwargs"),
        ),
        ("template / prompt", f"{prov.get('template')} / {prov.get('prompt')!r}"),
        ("methods", prov.get("method_params") or "none (baseline)"),
    ]
    return [
        "## Provenance",
        "",
        f"Recorded {prov.get('recorded')}.",
        "",
        *_table(["what", "value"], rows),
        "",
    ]


def write_report(
    run_dir: Path,
    payload: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Any],
) -> Path:
    """Write ``RUN_DIR/report.md``: settings, metrics with intervals, provenance, anchors, hallucination
    examples, errors."""
    settings = payload["settings"]
    resolved = payload.get("resolved") or {}
    task = payload["task"]
    lines = [
        f"# steer eval {task}: {Path(str(settings['model'])).name or settings['model']} — {payload['method']}",
        "",
        f"Run folder `{payload['run_dir']}`, settings hash `{payload['settings_hash']}`, written {payload['written']}.",
        "",
        "## Settings",
        "",
    ]
    rows = [(k, v) for k, v in settings.items() if k != "selection"]
    rows += [(f"selection.{k}", v) for k, v in (settings.get("selection") or {}).items()]
    rows += [(f"resolved.{k}", v) for k, v in resolved.items() if k != "provenance"]
    lines += _table(["setting", "value"], rows)
    samples = payload["samples"]
    lines += [
        "",
        "## Metrics",
        "",
        f"{samples['scored']} of {samples['total']} samples scored, {samples['errors']} errors. "
        "Intervals: bootstrap 95% over images (↓ lower is better, ↑ higher is better).",
        "",
    ]
    lines += _table(["metric", "value", "95% interval"], _metric_rows(payload))
    details = payload["details"]
    scored = scores.get("scored") or []
    if task == "chair":
        counts = details["overall"]["counts"]
        lines += [
            "",
            "Counts: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f". Ground truth {details['config']['gt_source']} (md5 {details['config']['gt_md5']}), "
            f"lineage {details['config']['lineage']}.",
        ]
    else:
        multi = len(details["splits"]) > 1
        for split, row in details["splits"].items():
            lines.append("")
            lines.append(
                f"{split}: n {row['n']}, TP {row['tp']}, FP {row['fp']}, TN {row['tn']}, "
                f"FN {row['fn']}, unknown {row['unknown']}, missing {row['missing']}."
            )
            notes = off_format_notes(
                payload["metrics"],
                [r for r in scored if r.get("split") == split],
                f" ({split})" if multi else "",
            )
            lines += ["", *notes] if notes else []
        if multi and not details["checks"]["recall_equal_across_splits"]:
            lines += [
                "",
                "Warning: TP/FN differ across splits although the positives are identical "
                "(nondeterminism, batching or padding).",
            ]
    lines.append("")
    lines += _provenance_lines(payload)
    lines += _anchor_lines(payload)
    lines += _chair_examples(scored) if task == "chair" else _pope_examples(scored)
    errors = [r for r in records if r.get("error")]
    lines += ["## Errors", ""]
    if errors:
        lines += _table(
            ["sample", "image", "error"], [(r["key"], r.get("image"), r["error"]) for r in errors[:20]]
        )
        if len(errors) > 20:
            lines.append(f"... and {len(errors) - 20} more (see samples.jsonl).")
    else:
        lines.append("None.")
    lines.append("")
    path = Path(run_dir) / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
