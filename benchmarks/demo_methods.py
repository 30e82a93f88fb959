"""The README's table: every VLM method with its default settings on the built-in benchmark (offline, CPU).

For greedy decoding and for each method, runs the README's own commands in this process::

    steer eval chair --model builtin:demo [--method M] --num-images N --out OUT/chair-<M>
    steer eval pope  --model builtin:demo [--method M] --num-images N --out OUT/pope-<M>   # all 3 splits

and prints one markdown row per method: CHAIR_s, CHAIR_i, Recall, caption length, POPE F1 per split and mean,
POPE accuracy (mean), plus the wall time of both runs. Runs resume (same ``--out``): a second invocation only
rescores. The demo model is steer-demo-llava (``steer/zoo/demo/``), the split the built-in SynthScenes one.

    python benchmarks/demo_methods.py                          # all methods, 500 images (about 4 minutes on 2 cores)
    python benchmarks/demo_methods.py --num-images 100 --methods greedy,vhr
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import typer

from steer.cli import app

METHODS = ("greedy", "var", "vhr", "cca", "fastervlm", "vista", "vcd", "pai", "beam5", "opera")
"""``greedy`` is the unsteered model (greedy decoding, as every row but two); ``beam5`` the unsteered model with
``--num-beams 5``, the reference of ``opera`` (a beam search: it runs with ``--num-beams 5``, its official setting)."""

#: extra ``steer eval`` arguments per row; rows named here without a method run unsteered.
EXTRA: dict[str, list[str]] = {"beam5": ["--num-beams", "5"], "opera": ["--num-beams", "5"]}
UNSTEERED = ("greedy", "beam5")


def run(task: str, method: str, num_images: int, out: Path) -> tuple[dict[str, Any] | None, float]:
    """One ``steer eval`` run; returns its metrics (None when the run refused, e.g. VAR without sink
    channels: the CLI has printed why) and wall seconds."""
    args = ["eval", task, "--model", "builtin:demo", "--num-images", str(num_images), "--out", str(out)]
    args += ["--no-progress"] + (["--method", method] if method not in UNSTEERED else []) + EXTRA.get(method, [])
    start = time.perf_counter()
    code = typer.main.get_command(app).main(args, standalone_mode=False)
    seconds = time.perf_counter() - start
    if code not in (None, 0) or not (out / "metrics.json").is_file():
        return None, seconds
    return json.loads((out / "metrics.json").read_text())["metrics"], seconds


def row(method: str, chair: dict[str, Any] | None, pope: dict[str, Any] | None, seconds: float) -> str:
    if chair is None or pope is None:
        return f"| `{method}` | " + " | ".join(["n/a"] * 9) + f" | {seconds:.0f} |"
    cells = [
        {"greedy": "greedy (no method)", "beam5": "beam 5 (no method)"}.get(method, f"`{method}`"),
        chair["CHAIR_s"],
        chair["CHAIR_i"],
        chair["Recall"],
        chair["Len"],
        pope["F1 (random)"],
        pope["F1 (popular)"],
        pope["F1 (adversarial)"],
        pope["F1 (mean)"],
        pope["Accuracy (mean)"],
        f"{seconds:.0f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


HEADER = (
    "| method | CHAIR_s ↓ | CHAIR_i ↓ | Recall ↑ | Len | POPE F1 random | popular | adversarial | "
    "F1 mean ↑ | Acc mean ↑ | s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; greedy = no method")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("runs/demo_methods"))
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for method in methods:
        chair, t_chair = run("chair", method, args.num_images, args.out / f"chair-{method}")
        pope, t_pope = run("pope", method, args.num_images, args.out / f"pope-{method}")
        rows.append(row(method, chair, pope, t_chair + t_pope))
        print(rows[-1], flush=True)
    table = HEADER + "\n" + "\n".join(rows)
    print(f"\nbuilt-in benchmark, {args.num_images} images, greedy decoding (beam5, opera: 5 beams):\n\n{table}")
    (args.out / "table.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
