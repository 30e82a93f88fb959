"""``report.html`` of a run: metrics with intervals, provenance, and a gallery of the images with what the model
said about them (one self-contained file: thumbnails and the chart are embedded).

CHAIR: each card is an image and its caption, hallucinated object words marked red, correctly named objects
green, with the ground truth; captions with hallucinations come first. POPE: each card is an image with its
questions and answers, a yes to an absent object (a hallucination) marked red, a no to a present one amber;
images with hallucinations come first. At most ``max_items`` cards (the report says how many were left out).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steer.evals.metrics import direction
from steer.evals.report import off_format_notes

__all__ = ["HTML_FILE", "write_html"]

HTML_FILE = "report.html"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:300px;font-size:13px}
.card img{width:100%;image-rendering:pixelated;border-radius:4px}.none{color:#888}
mark.h{background:#f8b4b4;color:#7a0000;font-weight:bold}mark.ok{background:#c9efc9}
li.fp{color:#b00000;font-weight:bold}li.fn{color:#a15c00}small{color:#666}
"""


def _thumbnail(path: Path | None, side: int = 256) -> str | None:
    """A JPEG data URI of the image at ``path`` (at most ``side`` px), or ``None`` when it cannot be read."""
    if path is None:
        return None
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            if image.width < side // 2:  # tiny images (the demo's 64 px) are shown larger, pixelated by CSS
                image = image.resize((image.width * 4, image.height * 4), Image.Resampling.NEAREST)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except Exception:  # an unreadable image is an error record already; show no picture
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str | None) -> str:
    return f'<img src="{uri}" alt="">' if uri else '<p class="none">(image not readable)</p>'


def _mark(caption: str, words: Sequence[str], css: str) -> str:
    for word in sorted(set(words), key=len, reverse=True):
        caption = re.sub(
            rf"(?<![\w>])({re.escape(word)}(?:s|es)?)\b",
            rf'<mark class="{css}">\1</mark>',
            caption,
            flags=re.IGNORECASE,
        )
    return caption


def _chair_cards(
    scored: Sequence[Mapping[str, Any]], paths: Mapping[str, Path], limit: int
) -> tuple[list[str], int]:
    ordered = sorted(scored, key=lambda r: (not r["hallucinated"], r["image_id"]))
    cards = []
    for rec in ordered[:limit]:
        bad = [h["word"] for h in rec["hallucinated"]]
        good = [m["word"] for m in rec["mentions"] if m["word"] not in bad]
        text = _mark(_mark(html.escape(rec["caption"]), bad, "h"), good, "ok")
        nodes = sorted({h["node"] for h in rec["hallucinated"]})
        cards.append(
            '<div class="card">'
            + _img(_thumbnail(paths.get(str(rec["image_id"]))))
            + f"<p>{text}</p>"
            + (f"<p><b>hallucinated:</b> {html.escape(', '.join(nodes))}</p>" if nodes else "")
            + f"<p><small>image {rec['image_id']}; ground truth: {html.escape(', '.join(rec['gt']) or 'none')}"
            "</small></p></div>"
        )
    return cards, max(len(ordered) - limit, 0)


def _pope_cards(
    scored: Sequence[Mapping[str, Any]], paths: Mapping[str, Path], limit: int
) -> tuple[list[str], int]:
    by_image: dict[str, list[Mapping[str, Any]]] = {}
    for rec in scored:
        by_image.setdefault(str(rec["image"]), []).append(rec)

    def hallucinations(items: Sequence[Mapping[str, Any]]) -> int:
        return sum(1 for r in items if r["label"] == "no" and r["prediction"] == "yes")

    ordered = sorted(by_image.items(), key=lambda kv: (-hallucinations(kv[1]), kv[0]))
    cards = []
    for image, items in ordered[:limit]:
        rows = []
        for r in items:
            css = (
                "fp"
                if r["label"] == "no" and r["prediction"] == "yes"
                else "fn"
                if r["label"] == "yes" and r["prediction"] != "yes"
                else ""
            )
            rows.append(
                f'<li class="{css}">{html.escape(str(r.get("split", "")))}: {html.escape(r["text"])} '
                f"<b>{html.escape(r['answer'])}</b> <small>(label {r['label']}, read as {r['prediction']})</small></li>"
            )
        cards.append(
            '<div class="card">' + _img(_thumbnail(paths.get(image))) + f"<ul>{''.join(rows)}</ul>"
            f"<p><small>{html.escape(image)}</small></p></div>"
        )
    return cards, max(len(ordered) - limit, 0)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _chart(payload: Mapping[str, Any]) -> str:
    """The run's metrics as bars with their intervals (one embedded PNG)."""
    from steer.evals import plots

    metrics, intervals = payload["metrics"], payload.get("intervals") or {}
    names = [n for n in metrics if n != "Len"]
    if not names:
        return ""
    chart = plots.bar_chart(
        [metrics[n] for n in names],
        names,
        intervals=[intervals.get(n) for n in names],
        title="metrics (percent) with 95% intervals",
        size=(max(120 + 70 * len(names), 360), 300),
    )
    buffer = io.BytesIO()
    chart.save(buffer, format="PNG")
    return (
        f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}" alt="chart">'
    )


def write_html(
    run_dir: Path,
    payload: Mapping[str, Any],
    scored: Sequence[Mapping[str, Any]],
    image_paths: Mapping[str, Path],
    *,
    max_items: int = 60,
) -> Path:
    """Write ``RUN_DIR/report.html``. ``image_paths`` maps CHAIR image ids / POPE image names to files."""
    task = payload["task"]
    settings = payload["settings"]
    intervals = payload.get("intervals") or {}
    rows = [
        (
            f"{name} {direction(name)}".strip(),
            value,
            "[{}, {}]".format(*intervals[name]) if name in intervals else "",
        )
        for name, value in payload["metrics"].items()
    ]
    samples = payload["samples"]
    notes: list[str] = []
    if task == "pope":
        splits = list(payload["details"].get("splits") or {})
        for split in splits:
            notes += off_format_notes(
                payload["metrics"],
                [r for r in scored if r.get("split") == split],
                f" ({split})" if len(splits) > 1 else "",
            )
    cards, left_out = (_chair_cards if task == "chair" else _pope_cards)(scored, image_paths, max_items)
    prov = payload.get("provenance") or {}
    model = prov.get("model") or {}
    prov_rows = [
        ("versions", ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items() if v)),
        ("git", (prov.get("git") or {}).get("commit", "not a checkout")),
        ("device / dtype", f"{prov.get('device')} / {prov.get('dtype')}"),
        ("model", f"{model.get('name')} (revision {model.get('revision')})"),
        ("weights sha256", (model.get("weights") or {}).get("sha256")),
        ("seed", prov.get("seed")),
        ("decoding", (prov.get("generation") or {}).get("effective")),
        ("methods", prov.get("method_params") or "none (baseline)"),
    ]
    legend = (
        '<p>Captions: <mark class="h">hallucinated object</mark>, <mark class="ok">object in the image</mark>.</p>'
        if task == "chair"
        else '<p>Answers: <span style="color:#b00000;font-weight:bold">yes to an absent object</span> '
        '(hallucination), <span style="color:#a15c00">no to a present object</span>.</p>'
    )
    title = (
        f"steer eval {task}: {Path(str(settings['model'])).name or settings['model']} — {payload['method']}"
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Run folder <code>{html.escape(str(payload['run_dir']))}</code>, settings hash "
        f"<code>{payload['settings_hash']}</code>, written {html.escape(str(payload['written']))}. "
        f"{samples['scored']} of {samples['total']} samples scored, {samples['errors']} errors.</p>",
        "<h2>Metrics</h2>",
        _table(["metric", "value", "95% bootstrap interval over images"], rows),
        _chart(payload),
        *[f"<p>{html.escape(n)}</p>" for n in notes],
        "<h2>Provenance</h2>",
        _table(["what", "value"], prov_rows),
        "<h2>Gallery</h2>",
        legend,
        f'<div class="gallery">{"".join(cards)}</div>',
        f"<p><small>{left_out} more not shown (report.md and samples.jsonl have them all).</small></p>"
        if left_out
        else "",
    ]
    page = (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    path = Path(run_dir) / HTML_FILE
    path.write_text(page, encoding="utf-8")
    return path
