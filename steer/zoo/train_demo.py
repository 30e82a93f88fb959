"""Train steer-demo-llava on SynthScenes captions: ``python -m steer.zoo.train_demo --steps N --seed S --out DIR``.

Everything derives from ``--seed``: the model's initial weights, the training scenes
(`synthscenes.sample_scenes(seed, n_scenes)`) and the batch order (a seeded `torch.Generator`). Training runs
on CPU with one thread and `torch.use_deterministic_algorithms(True)`, so the same seed gives the same loss
curve. An example is a scene's caption (prompt `demo_model.caption_prompt()`) or, with probability
``qa_fraction``, a yes/no question about a present or an absent kind (prompt `demo_model.question_prompt`,
answer ``<kind> yes`` / ``no``, see `demo_model.answer`; ``partner_questions`` of the no-questions ask about
the absent partner of a present trigger, POPE's adversarial case), each target followed by ``</s>``; the loss
is only on the target (prompt and padding are labelled -100) and averaged per example (`row_mean_loss`).
Before that, the vision tower alone learns which kinds a scene holds (`pretrain_vision`), and is then trained
on at a tenth of the learning rate, as LLaVA starts from a pretrained CLIP tower. The loss of every step is
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

    steps: int = 2500
    seed: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    n_scenes: int = 4000
    grad_clip: float = 1.0
    qa_fraction: float = 0.5
    vision_steps: int = 1200
    vision_batch_size: int = 64
    vision_lr: float = 1e-3
    vision_lr_scale: float = 0.1
    partner_questions: float = 0.5


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
    """Training examples from `synthscenes`: pixel tensors rendered lazily (and kept), token ids.

    An example is either a caption (prompt `demo_model.CAPTION_PROMPT`, target the scene's caption) or a
    yes/no question (prompt `question_prompt`, target `demo_model.answer`), each followed by ``</s>``.
    """

    def __init__(self, processor: Any, seed: int, n_scenes: int) -> None:
        self.processor = processor
        self.scenes = synthscenes.sample_scenes(seed, n_scenes)
        tok = processor.tokenizer
        self._tok = tok
        probe = [synthscenes.render(self.scenes[0], demo_model.IMAGE_SIZE)]
        # prompts as the processor expands them (one <image> -> IMAGE_TOKENS copies)
        self.caption_prompt: list[int] = self._prompt_ids(demo_model.CAPTION_PROMPT, probe)
        self.question_prompts: dict[str, list[int]] = {
            k: self._prompt_ids(demo_model.question_prompt(k), probe) for k in synthscenes.KINDS
        }
        self.caption_ids = [
            tok(s.caption, add_special_tokens=False).input_ids + [tok.eos_token_id] for s in self.scenes
        ]
        self._pixels: dict[int, torch.Tensor] = {}

    def _prompt_ids(self, text: str, probe: list[Any]) -> list[int]:
        return self.processor(images=probe, text=[text], return_tensors="pt").input_ids[0].tolist()

    def pixels(self, i: int) -> torch.Tensor:
        if i not in self._pixels:
            image = synthscenes.render(self.scenes[i], demo_model.IMAGE_SIZE)
            self._pixels[i] = self.processor.image_processor(image, return_tensors="pt").pixel_values[0]
        return self._pixels[i]

    def question(
        self, i: int, pick: float, which: float, partner_share: float = 0.0
    ) -> tuple[list[int], list[int]]:
        """``(prompt ids, target ids)`` of a yes/no question about scene `i`: a present kind when
        ``pick < 0.5`` (answer yes), else an absent one (answer no), chosen uniformly by ``which`` in [0, 1).

        When the scene holds a trigger without its partner, a no-question asks about that partner (POPE's
        adversarial case) if ``which < partner_share``, else about any absent kind, ``which`` being rescaled to
        [0, 1) for either choice. The target is `demo_model.answer`:
        ``cup yes </s>`` / ``no </s>``."""
        kinds = self.scenes[i].kinds
        if pick < 0.5:
            pool, present = [k for k in synthscenes.KINDS if k in kinds], True
        else:
            present = False
            partners = [
                partner
                for trigger, (partner, _) in synthscenes.PAIRS.items()
                if trigger in kinds and partner not in kinds
            ]
            if partners and which < partner_share:
                pool, which = partners, which / partner_share
            else:
                pool = [k for k in synthscenes.KINDS if k not in kinds]
                if partners:  # which is in [partner_share, 1): stretch it back to [0, 1)
                    which = (which - partner_share) / (1.0 - partner_share)
        kind = pool[min(int(which * len(pool)), len(pool) - 1)]
        target = self._tok(demo_model.answer(kind, present), add_special_tokens=False).input_ids
        return self.question_prompts[kind], target + [self._tok.eos_token_id]

    def batch(
        self,
        indices: list[int],
        draws: torch.Tensor | None = None,
        qa_fraction: float = 0.0,
        partner_share: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Right-padded batch: ``input_ids``, ``attention_mask``, ``pixel_values`` and ``labels``.

        `draws` (``len(indices) x 3`` uniforms) decide per row caption vs. question (first column below
        `qa_fraction` -> question), yes vs. no and which kind (`question`, with `partner_share`); without them
        every row is a caption.
        """
        pad = self._tok.pad_token_id
        pairs = []
        for r, i in enumerate(indices):
            u = draws[r].tolist() if draws is not None else [1.0, 0.0, 0.0]
            if u[0] < qa_fraction:
                pairs.append(self.question(i, u[1], u[2], partner_share))
            else:
                pairs.append((self.caption_prompt, self.caption_ids[i]))
        rows = [prompt + target for prompt, target in pairs]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, ((prompt, _), row) in enumerate(zip(pairs, rows)):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            labels[r, len(prompt) : len(row)] = ids[r, len(prompt) : len(row)]
        pixel_values = torch.stack([self.pixels(i) for i in indices])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "labels": labels}


def presence_targets(scenes: list[synthscenes.Scene]) -> torch.Tensor:
    """``(n_scenes, 20)`` 0/1 targets: which of `synthscenes.KINDS` each scene holds."""
    return torch.tensor([[k in s.kinds for k in synthscenes.KINDS] for s in scenes], dtype=torch.float32)


def pretrain_vision(
    model: Any, data: SceneData, cfg: TrainConfig, gen: torch.Generator, log_every: int = 0
) -> list[float]:
    """Stage 1: train the vision tower alone to tell which kinds a scene holds (as LLaVA starts from a
    pretrained CLIP tower). Two temporary linear heads read the layer the projector reads
    (``vision_feature_layer``): the [CLS] token and the max over patch tokens; the loss is the sum of their
    multi-label BCE losses. The [CLS] head makes the [CLS] token attend to the objects, which is what
    FasterVLM's [CLS]-attention pruning relies on. The heads are discarded. Returns the loss of every step."""
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    n_kinds = len(synthscenes.KINDS)
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n_kinds) for _ in range(2)])
    targets = presence_targets(data.scenes)
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    layer = model.config.vision_feature_layer
    losses: list[float] = []
    tower.train()
    start = time.time()
    for step in range(cfg.vision_steps):
        idx = torch.randint(0, len(data.scenes), (cfg.vision_batch_size,), generator=gen).tolist()
        pixels = torch.stack([data.pixels(i) for i in idx])
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        y = targets[idx]
        loss = bce(heads[0](states[:, 0]), y) + bce(heads[1](states[:, 1:].amax(dim=1)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == cfg.vision_steps - 1):
            print(f"vision {step:5d}  loss {losses[-1]:.4f}  {time.time() - start:7.1f}s", flush=True)
    return losses


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each row's target tokens, then over rows.

    A token-level mean (what ``model(labels=...)`` returns) would give a 25-token caption twelve times the
    weight of a 2-token ``yes </s>`` answer; averaging per row gives every example the same weight.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none"
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).float()
    return ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


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
    begin = time.time()
    with deterministic_cpu(1):
        model, processor = demo_model.build(cfg.seed)
        data = SceneData(processor, cfg.seed, cfg.n_scenes)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)  # the temporary heads' initial weights
            vision_losses = pretrain_vision(model, data, cfg, gen, log_every)
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            key = (name.startswith("model.vision_tower."), param.ndim >= 2 and "embed" not in name)
            groups.setdefault(key, []).append(param)
        opt = torch.optim.AdamW(
            [
                {
                    "params": params,
                    "lr": cfg.lr * (cfg.vision_lr_scale if vision else 1.0),
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                }
                for (vision, decay), params in sorted(groups.items())
            ],
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
            draws = torch.rand(cfg.batch_size, 3, generator=gen)
            batch = data.batch(order[pos : pos + cfg.batch_size], draws, cfg.qa_fraction, cfg.partner_questions)
            pos += cfg.batch_size
            labels = batch.pop("labels")
            loss = row_mean_loss(model(**batch).logits, labels)
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
        log = {
            "config": asdict(cfg),
            "loss": losses,
            "vision_loss": vision_losses,
            "seconds": time.time() - begin,
        }
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
