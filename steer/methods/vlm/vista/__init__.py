"""VISTA — Visual Information Steering + Self-Logits Augmentation (Li et al., "The Hidden Life of Tokens:
Reducing Hallucination of Large Vision-Language Models via Visual Information Steering", ICML 2025,
arXiv 2502.03628; spec: ``shared/specs/vista.md``). The released code (LzVv123456/VISTA) is the reference.

Notation: L decoder blocks ℓ = 0..L-1; ``h_ℓ`` = output of block ℓ (residual stream, before the final norm);
``m_ℓ`` = output of block ℓ's MLP before it is added to the residual; ``f`` = final logits.

**VSV (visual steering vector)**, once per prefill and per row b (spec steps 1-2):

    v[b, ℓ] = h_ℓ^pos[b, last] - h_ℓ^neg[b, last]                    (fp32, every layer, no normalisation)

where *pos* is the prefill's own decoder input run again unsteered (same embeddings, mask, positions) and
*neg* is the same row with every image-token position removed (text-only positions). Injection at every
position, prefill and decode:

- ``mode="mlp"`` (released code), on each block's MLP output, with v̂ = v/‖v‖ and m̂ = m/‖m‖:

      s  = 1 + max(0, cos(m, -v̂))
      m' = ‖m‖ · normalize(m̂ + λ · s · v̂)                            (norm-preserving rotation towards v)

- ``mode="residual"`` (paper Eqs. 5-6), on each block's output:

      h̃ = h + λ · v_ℓ ,   h ← h̃ · ‖h‖ / ‖h̃‖

**SLA (self-logits augmentation)** (spec step 5), on the final logits, with the window W of blocks:

      S_k = lm_head(N(h_k))   (k < L-1; N = identity or the final norm),   S_{L-1} = f
      f'  = f + γ · (mean_{k∈W} S_k - f)  =  (1-γ) · f + γ · mean_{k∈W} S_k      (fp32, raw logits)

Edits: two :class:`~steer.edits.kinds.SourceRun` s (the prefill's own inputs, unsteered, and the adapter's
text-only variant of the prompt) with a :class:`~steer.edits.kinds.Collect` of every block's output at the
last real token in each; a :class:`~steer.edits.kinds.Transform` on every MLP output (``mode="mlp"``) or block
output (``mode="residual"``); for SLA a :class:`~steer.edits.kinds.Collect` of the window blocks' logit lens
(``layer.logits``, at the positions ``lm_head`` projects) and a :class:`~steer.edits.kinds.LogitsTransform`.

``Steering.state["vista"]`` (rows are the model's batch rows, beams and return sequences included)::

    {"vsv": True, "sla": True, "mode": "mlp", "lam": 0.17, "gamma": 0.3, "window": [s, e] | None,
     "final_norm": False, "num_layers": L,
     # after each prefill with VSV on:
     "v": Tensor [B, L, H] fp32 (cpu), "norms": Tensor [B, L], "pos_len": [B], "neg_len": [B],
     "rows": [{"v": [L, H], "norms": [L], "pos_len": int, "neg_len": int, "window": [s, e] | None}]}

Limits: the prefill must be one call (no chunked prefill); the batch must keep its rows between the
prefill and the decode steps (``generate`` does, beams included).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from steer.edits.context import EditContext
from steer.edits.kinds import Collect, Edit, LogitsTransform, SourceRun, Transform
from steer.methods.vlm.vista.equations import (
    EPS,
    augment_logits,
    check_window,
    resolve_window,
    rotate,
    similarity_scale,
    steer_mlp_output,
    steer_residual,
    steering_vector,
)
from steer.registry import Method, param, register

__all__ = [
    "VISTA",
    "augment_logits",
    "check_window",
    "resolve_window",
    "similarity_scale",
    "steer_mlp_output",
    "steer_residual",
    "steering_vector",
]


@register
class VISTA(Method):
    name = "vista"
    description = (
        "VISTA (Li et al., ICML 2025): steer every layer towards its with-image minus without-image state "
        "(VSV, strength lam) and mix in logits read from the blocks below the last (SLA, weight gamma)."
    )
    stage = "residual"
    needs_image_tokens = True  # per instance: only when VSV is on (image_tokens_needed)

    @dataclass
    class Params:
        lam: float = param(
            0.17,
            help="VSV strength lambda (captioning/CHAIR 0.17; POPE/yes-no 0.01); 0 = VSV off",
            range=(0.0, 1.0),
        )
        gamma: float = param(0.3, help="SLA mixing weight gamma; 0 = SLA off", range=(0.0, 1.0))
        window: str | list[int] = param(
            "code",
            help="SLA blocks: 'code' = [L-7, L-2], 'paper' = [L-6, L-2], or [start, end] (0-based, inclusive)",
        )
        mode: str = param(
            "mlp",
            help="VSV injection: 'mlp' (released code) or 'residual' (paper Eqs. 5-6)",
            choices=("mlp", "residual"),
        )
        final_norm: bool = param(False, help="apply the final norm to window states before lm_head (SLA)")
        enable_vsv: bool = param(True, help="turn the visual steering vector on")
        enable_sla: bool = param(True, help="turn self-logits augmentation on")

    # ---- parameters -------------------------------------------------------------------------------
    @property
    def vsv_on(self) -> bool:
        return bool(self.params.enable_vsv) and self.params.lam > 0

    @property
    def sla_on(self) -> bool:
        return bool(self.params.enable_sla) and self.params.gamma > 0

    @property
    def num_layers(self) -> int:
        return int(self.model.num_layers)

    @property
    def window(self) -> tuple[int, int]:
        return resolve_window(self.params.window, self.num_layers)

    def check(self) -> None:
        check_window(self.params.window, self.num_layers)

    def image_tokens_needed(self) -> bool:
        return self.vsv_on

    def is_noop(self) -> bool:
        if self.vsv_on or self.sla_on:
            return False
        warnings.warn(
            "vista: both parts are off (lam = 0 or enable_vsv=False, and gamma = 0 or enable_sla=False); "
            "nothing is installed",
            UserWarning,
            stacklevel=3,
        )
        return True

    def initial_state(self) -> dict[str, Any]:
        p = self.params
        return {
            "vsv": self.vsv_on,
            "sla": self.sla_on,
            "mode": p.mode,
            "lam": p.lam,
            "gamma": p.gamma,
            "window": list(self.window) if self.sla_on else None,
            "final_norm": p.final_norm,
            "num_layers": self.num_layers,
        }

    def edits(self) -> list[Edit]:
        p = self.params
        last = self.num_layers - 1
        out: list[Edit] = []
        if self.vsv_on:
            out += [
                SourceRun(name="pos", inputs="same"),
                SourceRun(name="neg", inputs="text_only"),
                Collect(name="pos", site="layer.out", select="last", runs=("pos",), fn=_capture),
                Collect(name="neg", site="layer.out", select="last", runs=("neg",), fn=_capture),
            ]
            if p.mode == "mlp":
                out.append(Transform(site="layer.mlp.out", layers="all", fn=self._mlp))
            else:
                out.append(Transform(site="layer.out", layers="all", fn=self._residual))
        if self.sla_on:
            start, end = self.window
            window = list(range(start, min(end, last - 1) + 1))
            if window:
                site = "layer.logits.normed" if p.final_norm else "layer.logits"
                out.append(Collect(name="window", site=site, layers=window, select="kept"))
            out.append(LogitsTransform(fn=self._mix_logits))
        return out

    # ---- steps 1-2: the vector (once per prefill, from the two auxiliary runs) ----------------------
    def _vectors(self, ectx: EditContext) -> dict[str, list[torch.Tensor]] | None:
        return ectx.once("vsv", lambda: self._compute_vectors(ectx))

    def _compute_vectors(self, ectx: EditContext) -> dict[str, list[torch.Tensor]] | None:
        pos, neg = ectx.collected_layers("pos"), ectx.collected_layers("neg")
        if not pos and not neg:
            return None  # the prefill ran with VISTA disabled: nothing to steer with in this call
        missing = [layer for layer in range(self.num_layers) if layer not in pos or layer not in neg]
        if missing:  # pragma: no cover - every block runs in both passes
            raise RuntimeError(f"vista: the auxiliary passes did not reach layer(s) {missing}")
        vectors = [steering_vector(pos[layer][0], neg[layer][0]) for layer in range(self.num_layers)]
        self._record(vectors, pos[0][1], neg[0][1])
        return {"v": vectors, "v_hat": [F.normalize(v, dim=-1, eps=EPS) for v in vectors]}

    def _record(self, vectors: list[torch.Tensor], pos_len: torch.Tensor, neg_len: torch.Tensor) -> None:
        """``Steering.state["vista"]`` per row (one host copy per prefill)."""
        v = torch.stack([x.detach().cpu() for x in vectors], dim=1)  # [B, L, H]
        norms = v.norm(dim=-1)
        pos_lengths, neg_lengths = pos_len.tolist(), neg_len.tolist()
        window = self.state.get("window")
        self.state.update(
            v=v,
            norms=norms,
            pos_len=pos_lengths,
            neg_len=neg_lengths,
            rows=[
                {
                    "v": v[b],
                    "norms": norms[b],
                    "pos_len": pos_lengths[b],
                    "neg_len": neg_lengths[b],
                    "window": window,
                }
                for b in range(v.shape[0])
            ],
        )

    def _vector(self, ectx: EditContext, key: str, rows: int) -> torch.Tensor | None:
        vectors = self._vectors(ectx)
        if vectors is None:
            return None
        assert ectx.layer is not None
        v = vectors[key][ectx.layer]
        if v.shape[0] != rows:
            raise RuntimeError(
                f"vista: steering vectors were computed for {v.shape[0]} rows but this step has {rows}; the batch "
                "must keep its rows between the prefill and the decode steps"
            )
        return v

    # ---- steps 3-4: injection ---------------------------------------------------------------------------
    def _mlp(self, m: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        v_hat = self._vector(ectx, "v_hat", m.shape[0])
        if v_hat is None:
            return None
        return rotate(m.float(), v_hat[:, None, :], self.params.lam).to(m.dtype)

    def _residual(self, hidden: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        v = self._vector(ectx, "v", hidden.shape[0])
        if v is None:
            return None
        return steer_residual(hidden, v[:, None, :], self.params.lam)

    # ---- step 5: SLA ----------------------------------------------------------------------------------
    def _mix_logits(self, f: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        states: dict[Any, torch.Tensor] = ectx.take("window")
        start, end = self.window
        last = self.num_layers - 1
        needed = [k for k in range(start, end + 1) if k < last]
        if any(k not in states for k in needed):
            return None  # lm_head called outside a full forward of the model
        for k in needed:
            if states[k].shape[:2] != f.shape[:2]:
                raise RuntimeError(
                    f"vista: window state of block {k} has {tuple(states[k].shape[:2])} rows/positions but lm_head "
                    f"projected {tuple(f.shape[:2])}"
                )

        def window_logits() -> Iterable[torch.Tensor]:
            for k in range(start, end + 1):
                yield f if k == last else states[k]

        return augment_logits(f, window_logits(), self.params.gamma)


def _capture(h: torch.Tensor, ectx: EditContext) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's output at the last real token (fp32 copy) and the run's real length per row."""
    padding = ectx.forward.padding_mask
    batch = h.shape[0]
    length = padding.long().sum(dim=1) if padding is not None else torch.full((batch,), ectx.forward.query_len)
    return h.to(torch.float32, copy=True), length
