"""The ``steer`` command."""

from __future__ import annotations

import json
import os
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="steer: training-free attention interventions for VLMs and Stable Diffusion.", no_args_is_help=True)
console = Console()


def _mount_evals() -> None:
    try:
        from steer.evals.cli import chair_app, eval_app, pope_app, show_command
    except ImportError:  # pragma: no cover - evals scoring not installed in this build
        return
    app.command("show")(show_command)
    app.add_typer(chair_app, name="chair", help="CHAIR caption hallucination scoring.")
    app.add_typer(pope_app, name="pope", help="POPE yes/no hallucination scoring.")
    app.add_typer(eval_app, name="eval", help="Generate + score CHAIR/POPE in one resumable run; compare runs.")


def _mount_calibration() -> None:
    try:
        from steer.calibration import calibrate_app
    except ImportError:  # pragma: no cover - no calibration commands in this build
        return
    app.add_typer(calibrate_app, name="calibrate", help="Find model-specific constants (e.g. VAR's sink channels).")


_mount_evals()
_mount_calibration()


def _version(value: bool) -> None:
    if value:
        from steer import __version__

        typer.echo(f"steer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print steer's version."),
) -> None:
    """steer: training-free attention interventions for VLMs and Stable Diffusion."""


def _valid(param: dict[str, Any]) -> str:
    if param.get("choices"):
        return "one of " + ", ".join(repr(c) for c in param["choices"])
    if param.get("range"):
        lo, hi = param["range"]
        return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    return ""


@app.command("methods")
def methods_command(
    name: str = typer.Argument("", help="Show one method: its parameters with defaults and ranges, its families."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the registered methods with their parameters (torch is not imported)."""
    from steer.manifest import load

    info = load()
    if name:
        found = [m for m in info if m["name"] == name]
        if not found:
            typer.echo(f"error: unknown method {name!r}; methods: {', '.join(m['name'] for m in info)}", err=True)
            raise typer.Exit(2)
        info = found
    if as_json:
        typer.echo(json.dumps(info if not name else info[0]))
        return
    if name:
        m = info[0]
        console.print(f"[bold]{m['name']}[/bold] ({m['target']}, stage {m['stage']}): {m['description']}")
        console.print(f"families: {', '.join(m['families'])}")
        table = Table(title=f"{m['name']} parameters")
        for column in ("parameter", "default", "valid", "what it does"):
            table.add_column(column)
        for p in m["params"]:
            table.add_row(p["name"], repr(p["default"]), _valid(p), p.get("help") or "")
        console.print(table)
        return
    table = Table(title="steer methods")
    for column in ("method", "stage", "what it does", "parameters (default)"):
        table.add_column(column)
    for m in info:
        params = ", ".join(f"{p['name']}={p['default']!r}" for p in m["params"])
        table.add_row(m["name"], m["stage"], m["description"], params)
    console.print(table)


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@app.command("demo")
def demo(
    family: str = typer.Option(
        "llava",
        help="Tiny zoo family: llava, llava_next, qwen2_vl, qwen2_5_vl, qwen3_vl, llava_onevision, gemma3, internvl, "
        "smolvlm.",
    ),
    method: str = typer.Option("image_attention", help="Method to apply (see `steer methods`)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter NAME=VALUE (JSON value), repeatable."),
    max_new_tokens: int = typer.Option(12, help="Tokens to generate."),
    seed: int = typer.Option(0, help="Seed of the tiny model and the image."),
) -> None:
    """Run a steered generation on a built-in tiny model (offline) and print what changed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    import steer
    from steer import zoo

    if family not in zoo.FAMILIES:
        typer.echo(f"error: unknown family {family!r}; the tiny zoo has {', '.join(zoo.FAMILIES)}", err=True)
        raise typer.Exit(2)
    model: Any  # a *ForConditionalGeneration (load_tiny types it as PreTrainedModel, which has no generate)
    model, processor = zoo.load_tiny(family, seed=seed)
    prompt = zoo.chat_prompt(family, "Describe the image.")
    inputs = zoo.make_inputs(processor, family, [prompt], [[zoo.sample_image(seed)]])
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False}
    try:
        handle = steer.apply(model, method, **_parse_params(param))
    except steer.SteerError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    handle.remove()
    with torch.no_grad():
        plain_logits = model(**inputs).logits[:, -1].float()
        plain = model.generate(**inputs, **gen)
        with steer.apply(model, method, **_parse_params(param)) as handle:
            steered_logits = model(**inputs).logits[:, -1].float()
            steered = model.generate(**inputs, **gen)
            installed = [type(e).__name__ for e in handle.edits]
            resolved = handle.params
        restored = model.generate(**inputs, **gen)
    n = inputs["input_ids"].shape[1]
    tok = processor.tokenizer
    table = Table(title=f"steer demo: {method} on tiny {family} (random weights, offline)")
    table.add_column("")
    table.add_column("value")
    table.add_row("parameters", json.dumps(resolved.get(method, {})))
    table.add_row("edits installed", ", ".join(installed) or "none (zero strength)")
    table.add_row("prompt tokens", f"{n} ({int(inputs['input_ids'].eq(model.config.image_token_id).sum())} image tokens)")
    table.add_row("max |Δ logit| at the last prompt position", f"{(steered_logits - plain_logits).abs().max().item():.4g}")
    table.add_row("unsteered tokens", str(plain[0, n:].tolist()))
    table.add_row("steered tokens", str(steered[0, n:].tolist()))
    changed = int((plain[0, n:] != steered[0, n:]).sum())
    table.add_row("generated tokens that changed", f"{changed} of {plain.shape[1] - n}")
    table.add_row("unsteered text", repr(tok.decode(plain[0, n:])))
    table.add_row("steered text", repr(tok.decode(steered[0, n:])))
    table.add_row("after remove(): identical to unsteered", str(bool(torch.equal(plain, restored))))
    console.print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
