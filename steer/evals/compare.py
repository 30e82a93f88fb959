"""``steer eval compare``: finished runs side by side, metric rows by run columns, with intervals.

Runs must be of one task on the same data (the same images, questions, ground truth and synonym table);
otherwise the comparison is refused (``force`` compares anyway, with a warning). Settings other than the
method that differ (tokens, template, decoding, seed, dtype, ...) are warned about: the differences may then
come from them.

Each run's metrics come with their bootstrap 95% intervals over images; each later run's difference from run 1
(``Δ``) comes with the interval of a paired bootstrap over the images both runs scored (`steer.evals.bootstrap`,
from the runs' ``per_image.json``; for runs written before that file existed, an unpaired normal approximation
from the two intervals, marked ``approx``). A difference whose interval contains 0 is marked ``~``: at this
number of images it is not distinguishable from no difference.

Formats: ``text`` (plain, fitted to the terminal width: runs are split into several blocks when they do not fit
in 80 columns), ``md``, ``csv`` (one row per metric and run) and ``json`` (the data of :func:`compare_data`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals import bootstrap
from steer.evals.metrics import direction
from steer.evals.report import load_run, load_units
from steer.evals.settings import flatten

__all__ = ["FORMATS", "compare_data", "format_compare"]

FORMATS = ("text", "md", "csv", "json")

_DATA_KEYS = {
    "chair": ("selection.image_ids_md5", "selection.gt_md5", "selection.synonyms_md5", "selection.n"),
    "pope": ("selection.questions_md5", "selection.splits", "selection.n_images", "selection.n"),
}
"""What identifies the data a run scored (selection fields of its settings)."""

_NOT_COMPARED = {"methods", "params", "recipe", "batch_size", "device_map", "images", "model", "task"}
"""Settings that may differ between compared runs without a warning (what is being compared, or how and
where it ran)."""


def _flat_settings(payload: Mapping[str, Any]) -> dict[str, Any]:
    settings = flatten(payload["settings"])
    return {
        k: v
        for k, v in settings.items()
        if k.split(".")[0] not in _NOT_COMPARED and not k.startswith("selection.")
    }


def _data_identity(payload: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten(payload["settings"])
    return {key: flat.get(key) for key in _DATA_KEYS.get(payload["task"], ())}


def _approx_delta(
    delta: float, a: Sequence[float] | None, b: Sequence[float] | None, decimals: int
) -> dict[str, Any] | None:
    """Unpaired normal approximation of the difference's interval from the two runs' 95% intervals."""
    if not a or not b:
        return None
    se = math.hypot((a[1] - a[0]) / (2 * 1.96), (b[1] - b[0]) / (2 * 1.96))
    lo, hi = round(delta - 1.96 * se, decimals), round(delta + 1.96 * se, decimals)
    return {"delta": delta, "interval": [lo, hi], "spans_zero": lo <= 0 <= hi, "approx": True}


def compare_data(run_dirs: Sequence[Path], *, force: bool = False) -> dict[str, Any]:
    """The comparison of finished runs: ``{"task", "metrics", "directions", "runs": [...], "warnings",
    "bootstrap"}``; each run has ``metrics``, ``intervals`` and (from run 2 on) ``deltas`` against run 1:
    ``{metric: {"delta", "interval", "spans_zero", "approx"} | None}``.

    Raises:
        EvalInputError: no run, an unfinished run, runs of different tasks, or (unless ``force``) runs of
            different data.
    """
    if not run_dirs:
        raise EvalInputError("give at least one run folder")
    run_dirs = [Path(d) for d in run_dirs]
    payloads = [load_run(d) for d in run_dirs]
    tasks = [p["task"] for p in payloads]
    if len(set(tasks)) > 1:
        listed = ", ".join(f"run {i} {t}" for i, t in enumerate(tasks, 1))
        raise EvalInputError(f"runs of different tasks cannot be compared ({listed})")
    task = tasks[0]
    warnings: list[str] = []
    base_data, base_settings = _data_identity(payloads[0]), _flat_settings(payloads[0])
    for i, payload in enumerate(payloads[1:], 2):
        data = _data_identity(payload)
        diff = [
            f"{k.removeprefix('selection.')} {base_data[k]} vs {data[k]}"
            for k in data
            if data[k] != base_data[k]
        ]
        if diff:
            message = (
                f"run {i} ({run_dirs[i - 1]}) scored other data than run 1 (other images, questions, split or "
                f"ground truth): {'; '.join(diff)}"
            )
            if not force:
                raise EvalInputError(message + "; compare runs of the same data, or pass --force")
            warnings.append(message)
        mine = _flat_settings(payload)
        differs = [
            f"{k} {base_settings.get(k, '<unset>')!r} vs {mine.get(k, '<unset>')!r}"
            for k in sorted(set(mine) | set(base_settings))
            if mine.get(k, "<unset>") != base_settings.get(k, "<unset>")
        ]
        if differs:
            warnings.append(
                f"run {i} differs from run 1 in settings other than the method: {'; '.join(differs)}"
            )
    names: list[str] = []
    for p in payloads:
        names += [k for k in p["metrics"] if k not in names]
    decimals = 1 if task == "chair" else 2
    units = [load_units(d) for d in run_dirs]
    first = payloads[0]
    runs = []
    for i, (run_dir, payload, unit) in enumerate(zip(run_dirs, payloads, units), 1):
        deltas: dict[str, Any] | None = None
        if i > 1:
            paired = (
                bootstrap.paired_differences(units[0], unit)
                if units[0] is not None and unit is not None and units[0].splits == unit.splits
                else {}
            )
            deltas = {}
            for name in names:
                if name not in payload["metrics"] or name not in first["metrics"]:
                    deltas[name] = None
                    continue
                delta = round(payload["metrics"][name] - first["metrics"][name], decimals)
                if name in paired:
                    deltas[name] = {**paired[name], "delta": delta, "approx": False}
                else:
                    deltas[name] = _approx_delta(
                        delta,
                        (first.get("intervals") or {}).get(name),
                        (payload.get("intervals") or {}).get(name),
                        decimals,
                    ) or {"delta": delta, "interval": None, "spans_zero": None, "approx": True}
        runs.append(
            {
                "index": i,
                "run": str(run_dir),
                "method": payload.get("method", "?"),
                "model": Path(str(payload["settings"]["model"])).name or str(payload["settings"]["model"]),
                "samples": payload["samples"],
                "metrics": payload["metrics"],
                "intervals": payload.get("intervals") or {},
                "deltas": deltas,
            }
        )
    return {
        "task": task,
        "metrics": names,
        "directions": {name: direction(name) for name in names},
        "runs": runs,
        "warnings": warnings,
        "bootstrap": bootstrap.describe(len(units[0]) if units[0] is not None else 0),
    }


# --------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------


def _num(value: Any, decimals: int) -> str:
    return f"{value:.{decimals}f}" if isinstance(value, (int, float)) else "—"


def _value_cell(run: Mapping[str, Any], name: str, decimals: int) -> str:
    value = run["metrics"].get(name)
    if value is None:
        return "—"
    interval = run["intervals"].get(name)
    text = _num(value, decimals)
    return text + (f" [{_num(interval[0], decimals)}, {_num(interval[1], decimals)}]" if interval else "")


def _delta_cell(run: Mapping[str, Any], name: str, decimals: int) -> str:
    deltas = run.get("deltas")
    if deltas is None:
        return ""
    d = deltas.get(name)
    if d is None:
        return "—"
    text = f"{d['delta']:+.{decimals}f}"
    if d.get("interval"):
        lo, hi = d["interval"]
        text += f" [{lo:+.{decimals}f}, {hi:+.{decimals}f}]"
    if d.get("spans_zero"):
        text += " ~"
    if d.get("approx") and d.get("interval"):
        text += "a"
    return text


def _title(data: Mapping[str, Any]) -> str:
    first = data["runs"][0]
    return f"steer eval compare: {data['task']}, {first['samples']['scored']} samples scored in run 1"


def _legend(data: Mapping[str, Any]) -> list[str]:
    lines = [
        "Values with 95% bootstrap intervals over images; Δ against run 1 with the interval of a paired",
        "bootstrap; ~ = the interval of Δ contains 0 (no distinguishable difference); a = approximate",
        "(unpaired) interval; ↓ lower is better, ↑ higher is better.",
    ]
    if any(
        d and d.get("approx") and d.get("interval")
        for r in data["runs"][1:]
        for d in (r["deltas"] or {}).values()
    ):
        lines.append("Approximate intervals: runs without per_image.json (written by an older steer).")
    return lines


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def _text(data: Mapping[str, Any], width: int) -> str:
    decimals = 1 if data["task"] == "chair" else 2
    runs = data["runs"]
    out = [_fit(_title(data), width), ""]
    out += textwrap.wrap(" ".join(_legend(data)), width)
    out.append("")
    for run in runs:
        errors = run["samples"]["errors"]
        info = f"  {run['index']:>2}  {run['method']}  ({run['model']}, n {run['samples']['scored']}"
        info += f", {errors} errors)" if errors else ")"
        out.append(_fit(info, width))
        out.append(_fit(f"      {run['run']}", width))
    names = data["metrics"]
    label_width = max(len(f"{n} {data['directions'][n]}".strip()) for n in names) + 2
    cells = {
        run["index"]: {
            name: (_value_cell(run, name, decimals), _delta_cell(run, name, decimals)) for name in names
        }
        for run in runs
    }
    col = {
        run["index"]: max(
            [len(f"{run['index']} {run['method']}")]
            + [max(len(v), len(d)) for v, d in cells[run["index"]].values()]
        )
        + 2
        for run in runs
    }
    blocks: list[list[dict[str, Any]]] = [[]]
    used = label_width
    for run in runs:
        if blocks[-1] and used + col[run["index"]] > width:
            blocks.append([])
            used = label_width
        blocks[-1].append(run)
        used += col[run["index"]]
    for block in blocks:
        out.append("")
        header = "metric".ljust(label_width) + "".join(
            _fit(f"{r['index']} {r['method']}", col[r["index"]] - 2).ljust(col[r["index"]]) for r in block
        )
        out.append(header.rstrip())
        for name in names:
            label = f"{name} {data['directions'][name]}".strip()
            out.append(
                (
                    label.ljust(label_width)
                    + "".join(cells[r["index"]][name][0].ljust(col[r["index"]]) for r in block)
                ).rstrip()
            )
            deltas = [cells[r["index"]][name][1] for r in block]
            if any(deltas):
                row = "  Δ".ljust(label_width) + "".join(
                    d.ljust(col[r["index"]]) for d, r in zip(deltas, block)
                )
                out.append(row.rstrip())
    return "\n".join(out) + "\n"


def _md(data: Mapping[str, Any]) -> str:
    decimals = 1 if data["task"] == "chair" else 2
    runs = data["runs"]
    lines = [f"**{_title(data)}**", "", *_legend(data), ""]
    lines += [
        f"{r['index']}. `{r['method']}` ({r['model']}, n {r['samples']['scored']}): `{r['run']}`"
        for r in runs
    ]
    lines += ["", "| metric | " + " | ".join(f"{r['index']}: {r['method']}" for r in runs) + " |"]
    lines.append("|---|" + "---|" * len(runs))
    for name in data["metrics"]:
        cells = []
        for r in runs:
            value, delta = _value_cell(r, name, decimals), _delta_cell(r, name, decimals)
            cells.append(value + (f" (Δ {delta})" if delta else ""))
        label = f"{name} {data['directions'][name]}".strip()
        lines.append(f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(data: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["metric", "direction", "run", "folder", "method", "value", "lo", "hi", "delta", "delta_lo", "delta_hi",
         "delta_spans_zero", "delta_approx"]
    )  # fmt: skip
    for name in data["metrics"]:
        for r in data["runs"]:
            interval = r["intervals"].get(name) or [None, None]
            d = (r["deltas"] or {}).get(name) or {}
            d_interval = d.get("interval") or [None, None]
            writer.writerow(
                [name, data["directions"][name], r["index"], r["run"], r["method"], r["metrics"].get(name),
                 interval[0], interval[1], d.get("delta"), d_interval[0], d_interval[1], d.get("spans_zero"),
                 d.get("approx")]
            )  # fmt: skip
    return buffer.getvalue()


def format_compare(data: Mapping[str, Any], fmt: str = "text", width: int | None = None) -> str:
    """The comparison as ``text`` (fitted to ``width``, default: the terminal's, at most 120), ``md``, ``csv``
    or ``json``."""
    if fmt == "json":
        return json.dumps(data, default=str) + "\n"
    if fmt == "md":
        return _md(data)
    if fmt == "csv":
        return _csv(data)
    if fmt == "text":
        return _text(data, width or min(shutil.get_terminal_size((80, 24)).columns, 120))
    raise EvalInputError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
