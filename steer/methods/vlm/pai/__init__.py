"""PAI — Pay Attention to Image (Liu, Zheng, Chen, "Paying More Attention to Image: A Training-Free Method for
Alleviating Hallucination in LVLMs", ECCV 2024, arXiv 2407.21771; code LALBJ/PAI). Spec: ``shared/specs/pai.md``;
the equations are in :mod:`steer.methods.vlm.pai.equations`.

Two independent parts, any decoding:

1. **Attention boost**: in layers [start, end) (default [2, L)), every head, for the query row that predicts
   the next token (each row's last real position of a forward; in decode the only row), the image keys'
   pre-softmax scores become ``a'_j = a_j + α|a_j|`` before softmax (a :class:`~steer.edits.kinds.ScoreEdit`:
   the fused kernel over the other keys, the image block explicit, merged by log-sum-exp; no eager attention).
2. **Image-free contrast**: a branch on the prompt without its image (the adapter's text-only fact, own KV cache,
   following every step and every beam reorder) gives ``u``; the last position's logits become
   ``c + (γ−1)(c − u)`` on log-probs with the cutoff ``c_k ≥ max c + log β``.

Fixes of the official code, on by default (the official behaviours are options): the first generated token is
boosted when the contrast is on (``boost_first_token=False``: it is not, as the code's flag does); the
image-free branch's cache follows beam reorders (``reorder_aux_cache=False``: it never does, as the code).

``Steering.state["pai"]`` after a call: ``{"alpha", "gamma", "beta", "layers": [start, end), "attention": bool,
"cfg": bool, "rows": [{"image_keys": int, "aux_prompt_len": int | None}], "masked": [[per-row count of tokens
the cutoff removed] per step]}``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from steer.edits.context import EditContext
from steer.edits.kinds import Collect, Edit, LogitsTransform, Phase, ScoreEdit, SourceRun
from steer.errors import InvalidParameterError
from steer.methods.vlm.pai.equations import boost, cfg, default_layers
from steer.registry import Method, param, register

__all__ = ["PAI", "boost", "cfg", "default_layers"]

BRANCH = "no_image"


def _with_length(logits: torch.Tensor, ectx: EditContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The branch's logits and, at its prefill, its prompt length per row."""
    padding = ectx.forward.padding_mask
    lengths = padding.long().sum(dim=1) if padding is not None and ectx.forward.past_length == 0 else None
    return logits, lengths


@register
class PAI(Method):
    name = "pai"
    description = (
        "PAI (Liu et al., ECCV 2024): raise the image keys' attention scores of the row that predicts the next "
        "token (a + alpha|a|, layers 2..L) and contrast with the prompt without its image (gamma, beta cutoff)."
    )
    stage = "logits"
    needs_image_tokens = True

    @dataclass
    class Params:
        alpha: float = param(0.2, help="image-score boost alpha (a + alpha|a|); 0 = no attention edit", range=(0.0, None))
        gamma: float = param(1.1, help="contrast weight gamma (README 1.1; the script's default 2.0); 1 = no contrast", range=(1.0, None))
        beta: float = param(0.1, help="plausibility ratio beta in (0, 1]: keep p >= beta p_max of the conditional", range=(0.0, 1.0))
        layers: list[int] | None = param(None, help="edited layers [start, end) (half-open); None = [2, L)")
        enable_attn: bool = param(True, help="the attention boost")
        enable_cfg: bool = param(True, help="the image-free contrast")
        boost_first_token: bool = param(
            True, help="boost the prefill's last row when the contrast is on (False = the official code's flag quirk)"
        )
        reorder_aux_cache: bool = param(
            True, help="the image-free cache follows beam reorders (False = the official code: it never does)"
        )
        batch: str = param(
            "auto", help="the image-free branch: 'auto' (batched where the call allows), 'batched', 'sequential'",
            choices=("auto", "batched", "sequential"),
        )  # fmt: skip

    @property
    def layer_range(self) -> tuple[int, int]:
        layers = self.params.layers
        if layers is None:
            return default_layers(int(self.model.num_layers))
        return int(layers[0]), int(layers[1])

    @property
    def attn_on(self) -> bool:
        return bool(self.params.enable_attn) and self.params.alpha > 0

    @property
    def cfg_on(self) -> bool:
        return bool(self.params.enable_cfg) and self.params.gamma > 1

    def check(self) -> None:
        p = self.params
        if not 0 < p.beta <= 1:
            raise InvalidParameterError(
                f"pai: beta={p.beta!r} is outside (0, 1]; beta is the plausibility ratio (keep p >= beta p_max), "
                "e.g. 0.1 (README); it cannot be 0"
            )
        n = int(self.model.num_layers)
        if p.layers is not None:
            if len(p.layers) != 2:
                raise InvalidParameterError(f"pai: layers must be [start, end) (two ints), got {p.layers!r}")
            start, end = self.layer_range
            if not 0 <= start < end <= n:
                raise InvalidParameterError(
                    f"pai: layers=[{start}, {end}) must satisfy 0 <= start < end <= {n} (the model has {n} layers)"
                )

    def is_noop(self) -> bool:
        if self.attn_on or self.cfg_on:
            return False
        warnings.warn(
            "pai: both parts are off (alpha = 0 or enable_attn=False, and gamma = 1 or enable_cfg=False); "
            "nothing is installed",
            UserWarning,
            stacklevel=3,
        )
        return True

    def initial_state(self) -> dict[str, Any]:
        p = self.params
        return {
            "alpha": p.alpha, "gamma": p.gamma, "beta": p.beta, "layers": list(self.layer_range),
            "attention": self.attn_on, "cfg": self.cfg_on, "rows": [], "masked": [],
        }  # fmt: skip

    def edits(self) -> list[Edit]:
        p = self.params
        out: list[Edit] = []
        if self.attn_on:
            start, end = self.layer_range
            phase: Phase = "decode" if (self.cfg_on and not p.boost_first_token) else "all"
            out.append(ScoreEdit(layers=list(range(start, end)), fn=self._boost, keys="image", rows="last", phase=phase))
        if self.cfg_on:
            out += [
                SourceRun(name=BRANCH, inputs="text_only", follow=True, reorder=p.reorder_aux_cache, batch=p.batch),
                Collect(name=BRANCH, site="logits", runs=(BRANCH,), fn=_with_length),
                LogitsTransform(fn=self._contrast),
            ]
        else:
            out.append(LogitsTransform(fn=self._record))
        return out

    def _boost(self, scores: torch.Tensor, ectx: EditContext) -> torch.Tensor:
        return boost(scores, self.params.alpha)

    def _start(self, ectx: EditContext, aux: torch.Tensor | None) -> None:
        """``state["rows"]`` and a fresh ``state["masked"]`` at the first logits of a call."""
        if ectx.forward.phase != "prefill":
            return
        image = ectx.forward.image_mask
        counts = image.long().sum(dim=1).tolist() if image is not None else []
        aux_lengths = aux.tolist() if aux is not None else [None] * len(counts)
        self.state.update(
            rows=[{"image_keys": n, "aux_prompt_len": m} for n, m in zip(counts, aux_lengths)], masked=[]
        )

    def _record(self, logits: torch.Tensor, ectx: EditContext) -> None:
        ectx.once("state", lambda: self._start(ectx, None))
        return None

    def _contrast(self, logits: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        p = self.params
        collected = ectx.take(BRANCH).get(None)
        if collected is None:
            return None  # lm_head outside a forward of the model
        uncond, lengths = collected
        ectx.once("state", lambda: self._start(ectx, lengths))
        last = cfg(logits[:, -1], uncond[:, -1], p.gamma, p.beta)
        self.state["masked"].append((~torch.isfinite(last)).sum(dim=-1).tolist())
        out = logits.clone()
        out[:, -1] = last.to(logits.dtype)
        return out
