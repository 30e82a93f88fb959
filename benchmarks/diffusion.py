"""Time per image of the pipeline methods vs. the unsteered pipeline, on the tiny offline SD / SDXL. Not a test.

    /work/venv/bin/python benchmarks/diffusion.py [--kind sd|sdxl] [--size 64] [--steps 20] [--repeats 3]
                                                  [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--threads N]

The pipeline: `steer.zoo.build_sd(0, kind)` (random weights, built from configs, no download; see
steer/zoo/sd.py), DDIM, CFG 7.5, one prompt, one image, ``output_type="latent"`` plus one VAE decode (``"np"``)
so that the time is the whole call. Variants run interleaved, ``--repeats`` times after one warm-up each; the
median seconds per image is printed with its ratio to the unsteered pipeline, and, on CUDA, the peak memory of
one call (``torch.cuda.max_memory_allocated`` above what is held before it).

Variants: ``stock`` (the pipeline, nothing applied), ``astar`` (handle.pipe, all steps but the last),
``attend_and_excite`` (steps < 25 of T with refinement at 0/10/20 when T = 50, here scaled to T: thresholds at
0, T/5, 2T/5, max_iter_to_alter T/2), ``detector_guidance`` (CAM provider; attempts from 20% of the steps) and
``ae+dg``. On random weights the losses barely move and refinement runs to its cap, so A&E's figure is a worst
case.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import steer  # noqa: E402
from steer import zoo  # noqa: E402

PROMPT = "a cat and a dog"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def variants(steps: int) -> dict[str, dict[str, Any] | None]:
    ae = {
        "tokens": ["cat", "dog"],
        "thresholds": {0: 0.05, round(steps / 5): 0.5, round(2 * steps / 5): 0.8},
        "max_iter_to_alter": steps // 2,
    }
    dg = {"objects": ["a cat", "a dog"]}
    return {
        "stock": None,
        "astar": {"method": "astar", "tokens": ["cat", "dog"]},
        "attend_and_excite": {"method": "attend_and_excite", **ae},
        "detector_guidance": {"method": "detector_guidance", **dg},
        "ae+dg": {"method": ["attend_and_excite", "detector_guidance"], **ae, **dg},
    }


def run_once(pipe: Any, spec: dict[str, Any] | None, args: argparse.Namespace, device: str) -> tuple[float, int]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    call = dict(num_inference_steps=args.steps, height=args.size, width=args.size, generator=generator, output_type="np")
    handle = None
    target = pipe
    if spec is not None:
        spec = dict(spec)
        handle = steer.apply(pipe, spec.pop("method"), **spec)
        target = handle.pipe
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        start = time.perf_counter()
        target(PROMPT, **call)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - held if device == "cuda" else 0
    finally:
        if handle is not None:
            handle.remove()
    return elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="sd", choices=["sd", "sdxl"])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size / 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = zoo.build_sd(0, args.kind)
    if args.device != "cpu" or args.dtype != "fp32":
        pipe = pipe.to(args.device, DTYPES[args.dtype])
    table = variants(args.steps)
    times: dict[str, list[float]] = {name: [] for name in table}
    peaks: dict[str, int] = {}
    for spec in table.values():  # warm-up
        run_once(pipe, spec, args, args.device)
    for _ in range(args.repeats):
        for name, spec in table.items():
            elapsed, peak = run_once(pipe, spec, args, args.device)
            times[name].append(elapsed)
            peaks[name] = max(peaks.get(name, 0), peak)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        f"tiny {args.kind} ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f} M UNet params), "
        f"{args.size}x{args.size} px, {args.steps} DDIM steps, CFG 7.5, {args.dtype}, device {args.device} "
        f"({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"median of {args.repeats}"
    )
    base = statistics.median(times["stock"])
    print("| variant | s / image | × stock |" + (" peak MiB |" if args.device == "cuda" else ""))
    print("|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for name, values in times.items():
        med = statistics.median(values)
        row = f"| {name} | {med:.3f} | {med / base:.2f} |"
        if args.device == "cuda":
            row += f" {peaks[name] / 2**20:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
