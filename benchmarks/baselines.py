"""Cost of the baselines VCD, PAI, M3ID and OPERA on the LLaVA-1.5-shaped benchmark model. Not a test.

    /work/venv/bin/python benchmarks/baselines.py [--device cpu|cuda] [--new-tokens 16] [--repeats 3] [--clock auto|wall|cpu]

The model and prompt are those of ``benchmarks/attention_methods.py`` (its ``build``: Llama hidden 512, 8 layers,
8 heads, a 1-layer CLIP tower at 336 px / patch 14, 576 image tokens, a 1057-token prompt, batch 1, fp32 on the
CPU, bf16 on CUDA, sdpa). Every variant runs ``model.generate`` (the caller's only call) with
``min_new_tokens = max_new_tokens``:

* per-token decode time: a logits processor reads the clock once per step (``generate`` calls it right after
  each step's forward and logits edits); the median interval between two calls is the cost of one decoding step
  (forward, branch, logits edits, selection); "prefill" is the time from the call to the first step;
* peak memory of the whole N-token call above what is held before it (``benchmarks/memory.py``: CUDA's
  allocator statistics, or a live-tensor tracker on the CPU); it includes the KV caches;
* the reference of each row: unsteered greedy for VCD / PAI / M3ID (their contrastive branch batched with the
  caller's rows, one forward of 2B rows per step, or run sequentially), plain beam search (``num_beams=5``) for
  OPERA (tree and sequential look-ahead).

Medians over ``--repeats``, variants interleaved. ``--clock cpu`` (the default for a 1-thread CPU run) times
the thread's CPU time, so time the process spends descheduled on a shared machine does not count.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from attention_methods import CLOCK, build  # noqa: E402  (benchmarks/attention_methods.py)
from memory import peak_bytes  # noqa: E402  (benchmarks/memory.py)

import steer  # noqa: E402

GREEDY: dict[str, Any] = {"do_sample": False}
BEAM5: dict[str, Any] = {"do_sample": False, "num_beams": 5}

#: variant -> (method name or None, apply keyword arguments, generate keyword arguments, reference variant)
VARIANTS: dict[str, tuple[str | None, dict[str, Any], dict[str, Any], str]] = {
    "greedy (unsteered)": (None, {}, GREEDY, "greedy (unsteered)"),
    "vcd (batched branch)": ("vcd", {"batch": "batched", "seed": 0}, GREEDY, "greedy (unsteered)"),
    "vcd (sequential branch)": ("vcd", {"batch": "sequential", "seed": 0}, GREEDY, "greedy (unsteered)"),
    "pai (batched branch)": ("pai", {"batch": "batched"}, GREEDY, "greedy (unsteered)"),
    "pai (sequential branch)": ("pai", {"batch": "sequential"}, GREEDY, "greedy (unsteered)"),
    "pai (attention only)": ("pai", {"gamma": 1.0}, GREEDY, "greedy (unsteered)"),
    "m3id (batched branch)": ("m3id", {"batch": "batched"}, GREEDY, "greedy (unsteered)"),
    "beam 5 (unsteered)": (None, {}, BEAM5, "beam 5 (unsteered)"),
    "opera (tree look-ahead)": ("opera", {"lookahead": "tree"}, BEAM5, "beam 5 (unsteered)"),
    "opera (sequential look-ahead)": ("opera", {"lookahead": "sequential"}, BEAM5, "beam 5 (unsteered)"),
}


class StepClock:
    """A logits processor that notes the clock at every decoding step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(CLOCK["fn"]())
        return scores


def run(
    model: Any, inputs: dict[str, Any], method: str | None, settings: dict[str, Any], gen: dict[str, Any], n: int,
    clock: StepClock | None = None,
) -> Any:  # fmt: skip
    handle = steer.apply(model, method, **settings) if method else None
    extra = {"logits_processor": [clock]} if clock is not None else {}
    try:
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen, **extra)
    finally:
        if handle is not None:
            handle.remove()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    model: Any, inputs: dict[str, Any], device: str, new_tokens: int, repeats: int, names: list[str], memory: bool
) -> dict[str, dict[str, Any]]:
    samples: dict[str, dict[str, list[float]]] = {v: {"prefill": [], "steps": []} for v in names}
    for _ in range(repeats):
        for name in names:
            method, settings, gen, _ = VARIANTS[name]
            clock = StepClock()
            if device.startswith("cuda"):  # the clock must see finished work: sync in every step
                clock.__class__ = _SyncedClock
            _sync(device)
            start = CLOCK["fn"]()
            run(model, inputs, method, settings, gen, new_tokens, clock)
            stamps = clock.stamps
            samples[name]["prefill"].append(stamps[0] - start)
            samples[name]["steps"] += [b - a for a, b in zip(stamps, stamps[1:])]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        method, settings, gen, _ = VARIANTS[name]
        results[name] = {
            "prefill_ms": statistics.median(samples[name]["prefill"]) * 1e3,
            "decode_ms": statistics.median(samples[name]["steps"]) * 1e3,
        }
        if memory:
            peak = peak_bytes(functools.partial(run, model, inputs, method, settings, gen, new_tokens), device)
            results[name]["peak_mb"] = peak / 2**20
    return results


class _SyncedClock(StepClock):
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        torch.cuda.synchronize()
        return super().__call__(input_ids, scores)


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | reference | prefill ms | decode ms/token | × reference | peak MB | × reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        ref_name = VARIANTS[name][3]
        ref = results.get(ref_name, row)
        peak = row.get("peak_mb")
        peak_text = f"{peak:.1f}" if peak is not None else "–"
        peak_ratio = f"{peak / ref['peak_mb']:.2f}" if peak is not None and ref.get("peak_mb") else "–"
        lines.append(
            f"| {name} | {ref_name} | {row['prefill_ms']:.1f} | {row['decode_ms']:.2f} | "
            f"{row['decode_ms'] / ref['decode_ms']:.2f} | {peak_text} | {peak_ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1: one core, no contention)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (slow on the CPU)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    CLOCK["fn"] = time.thread_time if clock == "cpu" else time.perf_counter
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    for name in names:  # every row needs its reference
        ref = VARIANTS[name][3]
        if ref not in names:
            names.insert(0, ref)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, inputs = build(args.device, dtype)
    run(model, inputs, None, {}, GREEDY, 2)  # warm-up
    results = measure(model, inputs, args.device, args.new_tokens, args.repeats, names, not args.no_memory)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(
        f"baselines on the LLaVA-1.5-shaped model (1057-token prompt), {args.new_tokens} new tokens, median of "
        f"{args.repeats}, {clock} clock; device: {args.device} ({where}); torch {torch.__version__}\n"
    )
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": args.device, "clock": clock, "new_tokens": args.new_tokens, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
