"""Before/after images for one pipeline method, from the command line.

    python -m steer.diffusers.demo --method astar --tokens cat dog --prompt "a cat and a dog" --out out/
    python -m steer.diffusers.demo --model ./stable-diffusion-v1-5 --device cuda --dtype fp16 --steps 50 \
        --method detector_guidance --objects "a red cat" "a blue dog" --prompt "a red cat and a blue dog"

``--model tiny`` (default) is steer's offline random-weight pipeline (``zoo.load_tiny_sd``; its images are
noise-like, the point is the plumbing); any other value is a local folder or a hub id loaded with
``DiffusionPipeline.from_pretrained``. Writes ``before.png`` (the stock pipeline), ``after.png`` (the same
generator, steered), ``grid.png`` (the prompt's before/after grid, `steer.evals.plots.before_after_grid`),
``maps.png`` (A-STAR / A&E: the concept maps of the last updated step) and prints the per-step losses or
detection attempts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from steer.errors import SteerError, SteerInputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="steer: before/after images for a Stable Diffusion method")
    parser.add_argument("--model", default="tiny", help="'tiny' (offline zoo pipeline), a folder or a hub id")
    parser.add_argument("--method", default="astar", choices=["astar", "attend_and_excite", "detector_guidance"])
    parser.add_argument("--prompt", default="a cat and a dog")
    parser.add_argument("--tokens", nargs="*", default=["cat", "dog"], help="A-STAR / A&E concepts (words)")
    parser.add_argument("--objects", nargs="*", default=["a cat", "a dog"], help="Detector Guidance phrases")
    parser.add_argument("--param", "-p", action="append", default=[], help="extra method parameter NAME=JSON")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--out", default="steer-demo")
    args = parser.parse_args(argv)
    params: dict[str, Any] = {}
    for item in args.param:
        key, eq, raw = item.partition("=")
        if not eq:
            parser.error(f"--param expects NAME=JSON, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    try:
        run(args, params)
    except SteerError as error:  # a user's mistake: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def load_pipeline(model: str, dtype: torch.dtype) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a folder or hub id; a model that cannot be loaded is a
    `SteerInputError` (one line) rather than a traceback."""
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HFValidationError

    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.exists():
        raise SteerInputError(f"--model {model}: no such folder")
    try:
        return DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except (OSError, HFValidationError) as error:
        raise SteerInputError(f"cannot load --model {model}: {str(error).splitlines()[0]}") from None


def run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """Write before.png, after.png (and maps.png) for ``args``; ``params``: extra method parameters."""
    if args.model == "tiny":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import steer
    from steer import zoo

    if args.model == "tiny":
        pipe = zoo.load_tiny_sd(dtype=DTYPES[args.dtype])
    else:
        pipe = load_pipeline(args.model, DTYPES[args.dtype])
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.method == "detector_guidance":
        params.setdefault("objects", args.objects)
    else:
        params.setdefault("tokens", args.tokens)
    call = dict(num_inference_steps=args.steps)
    if args.size:
        call.update(height=args.size, width=args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def generate(p: Any) -> Any:
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        return p(args.prompt, generator=generator, **call).images[0]

    before = generate(pipe)
    before.save(out / "before.png")
    handle: Any = steer.apply(pipe, args.method, **params)
    with handle:
        after = generate(handle.pipe)
        after.save(out / "after.png")
        state = handle.state[args.method]
        if state.get("maps"):
            handle.save_attention_maps(out / "maps.png")
    print(f"{args.method} {handle.params[args.method]}")
    if args.method == "detector_guidance":
        for b, image in enumerate(state["images"]):
            print(f"image {b}: attempts {[(a['step'], a['success']) for a in image['attempts']]}")
    else:
        for record in state["log"]:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()})
    from steer.evals.plots import before_after_grid, save

    save(before_after_grid(args.prompt, [before], [after]), out / "grid.png")
    print(
        f"wrote {out / 'before.png'}, {out / 'after.png'}, {out / 'grid.png'}"
        + (f", {out / 'maps.png'}" if state.get("maps") else "")
    )


if __name__ == "__main__":
    main()
