"""Train steer-demo-llava on SynthScenes captions: ``python -m steer.zoo.train_demo --steps N --seed S --out DIR``.

Everything derives from ``--seed``: the model's initial weights, the training scenes
(`synthscenes.sample_scenes(seed, n_scenes)`) and the batch order (a seeded `torch.Generator`). Training runs
on CPU with one thread and `torch.use_deterministic_algorithms(True)`, so the same seed gives the same loss
curve. Each example is ``<s> <image>x64 describe the image .`` followed by the caption and ``</s>``; the loss is
only on the caption tokens and ``</s>`` (prompt and padding are labelled -100). The loss of every step is
written to ``DIR/train_log.json``; the model and processor are saved with `save_pretrained` (safetensors) at
the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import demo_model, synthscenes


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (all recorded in the log)."""

    steps: int = 3000
    seed: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    n_scenes: int = 4000
    grad_clip: float = 1.0


@contextmanager
def deterministic_cpu(threads: int = 1) -> Iterator[None]:
    """Run the body with `threads` intra-op threads and deterministic algorithms; restore both afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


class SceneData:
    """Training examples from `synthscenes`: pixel tensors rendered lazily (and kept), caption token ids."""

    def __init__(self, processor: Any, seed: int, n_scenes: int) -> None:
        self.processor = processor
        self.scenes = synthscenes.sample_scenes(seed, n_scenes)
        tok = processor.tokenizer
        # the prompt as the processor expands it (one <image> -> IMAGE_TOKENS copies); the same for every row
        self.prompt_ids: list[int] = (
            processor(
                images=[synthscenes.render(self.scenes[0], demo_model.IMAGE_SIZE)],
                text=[demo_model.CAPTION_PROMPT],
                return_tensors="pt",
            )
            .input_ids[0]
            .tolist()
        )
        self.caption_ids = [
            tok(s.caption, add_special_tokens=False).input_ids + [tok.eos_token_id] for s in self.scenes
        ]
        self._pixels: dict[int, torch.Tensor] = {}

    def pixels(self, i: int) -> torch.Tensor:
        if i not in self._pixels:
            image = synthscenes.render(self.scenes[i], demo_model.IMAGE_SIZE)
            self._pixels[i] = self.processor.image_processor(image, return_tensors="pt").pixel_values[0]
        return self._pixels[i]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch: ``input_ids``, ``attention_mask``, ``pixel_values`` and ``labels``."""
        pad = self.processor.tokenizer.pad_token_id
        rows = [self.prompt_ids + self.caption_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        n_prompt = len(self.prompt_ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            labels[r, n_prompt : len(row)] = ids[r, n_prompt : len(row)]
        pixel_values = torch.stack([self.pixels(i) for i in indices])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "labels": labels}


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    cfg: TrainConfig, out: str | os.PathLike | None = None, log_every: int = 0
) -> tuple[Any, Any, list[float]]:
    """Train steer-demo-llava with `cfg`; save model, processor and ``train_log.json`` to `out` if given.

    Returns ``(model, processor, losses)`` with one loss per step; the model is returned in eval mode.
    """
    with deterministic_cpu(1):
        model, processor = demo_model.build(cfg.seed)
        data = SceneData(processor, cfg.seed, cfg.n_scenes)
        gen = torch.Generator().manual_seed(cfg.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
        model.train()
        losses: list[float] = []
        order = torch.randperm(cfg.n_scenes, generator=gen).tolist()
        pos = 0
        start = time.time()
        for step in range(cfg.steps):
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(cfg.n_scenes, generator=gen).tolist(), 0
            batch = data.batch(order[pos : pos + cfg.batch_size])
            pos += cfg.batch_size
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == cfg.steps - 1):
                print(f"step {step:5d}  loss {losses[-1]:.4f}  {time.time() - start:7.1f}s", flush=True)
        model.eval()
    if out is not None:
        out = Path(out)
        demo_model.save(model, processor, out)
        log = {"config": asdict(cfg), "loss": losses, "seconds": time.time() - start}
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return model, processor, losses


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", required=True, help="folder for the saved model and train_log.json")
    parser.add_argument("--log-every", type=int, default=50)
    args = vars(parser.parse_args(argv))
    out, log_every = args.pop("out"), args.pop("log_every")
    train(TrainConfig(**args), out=out, log_every=log_every)


if __name__ == "__main__":
    main()
