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

How it reaches the model (core edits only):

- a ``ModuleHook`` pre-hook on the top-level model notes ``logits_to_keep`` (which positions ``lm_head``
  projects) for SLA;
- a ``ModuleHook`` pre-hook on the text model runs the positive and the negative auxiliary passes once per
  prefill, under ``runtime.disabled()`` with ``no_grad`` and no cache (the negative rows are VHR's no-image
  rows: :func:`steer.methods.vhr.strip_image_tokens` and VHR's text-only positions, M-RoPE included);
- ``ModuleHook`` forward hooks on every block with ``in_aux=True`` capture ``h_ℓ`` at the last real token
  inside VISTA's own auxiliary passes (and apply ``mode="residual"`` in the real pass);
- ``ModuleHook`` forward hooks on every block's MLP apply ``mode="mlp"``;
- ``ModuleHook`` forward hooks on the window blocks keep ``h_k`` at the projected positions, and a
  ``LogitsTransform`` mixes the logits (window projections run under a re-entrancy guard).

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

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from steer.edits import Edit, EditContext, LogitsTransform, ModuleHook
from steer.errors import InvalidParameterError
from steer.methods.vhr import VHR, last_positions
from steer.registry import Method, param, register

if TYPE_CHECKING:
    from steer.adapters.base import Adapter

EPS = 1e-12
_AUX_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


# ---------------------------------------------------------------------------------------------------
# the paper's equations as pure functions


def resolve_window(window: str | list[int] | tuple[int, int], num_layers: int) -> tuple[int, int]:
    """SLA window W (0-based, inclusive): ``"code"`` = [L-7, L-2], ``"paper"`` = [L-6, L-2], clipped into
    [0, L-1] (so a 4-layer model gets [0, 2]); an explicit (s, e) is returned as given (validate it with
    :func:`check_window`)."""
    last = num_layers - 1
    if isinstance(window, str):
        if window == "code":
            start, end = num_layers - 7, num_layers - 2
        elif window == "paper":
            start, end = num_layers - 6, num_layers - 2
        else:
            raise ValueError(f"window must be 'code', 'paper' or (start, end), got {window!r}")
        return min(max(start, 0), last), min(max(end, 0), last)
    start, end = window
    return int(start), int(end)


def check_window(window: Any, num_layers: int) -> None:
    """Raise :class:`InvalidParameterError` unless ``window`` is 'code', 'paper' or (s, e), 0 <= s <= e <= L-1."""
    if isinstance(window, str):
        if window not in ("code", "paper"):
            raise InvalidParameterError(
                f"vista: window={window!r} is not valid; use 'code' ([L-7, L-2]), 'paper' ([L-6, L-2]) or "
                f"[start, end] with 0 <= start <= end <= {num_layers - 1}"
            )
        return
    ok = (
        isinstance(window, (list, tuple))
        and len(window) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in window)
        and 0 <= window[0] <= window[1] <= num_layers - 1
    )
    if not ok:
        raise InvalidParameterError(
            f"vista: window={window!r} is not valid; give [start, end] (blocks, 0-based, inclusive) with "
            f"0 <= start <= end <= {num_layers - 1} (the model has {num_layers} decoder layers), or 'code'/'paper'"
        )


def steering_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Spec step 2: ``v = h^pos - h^neg`` (last real token, per layer) in fp32; no normalisation."""
    return positive.float() - negative.float()


def similarity_scale(m: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``s = 1 + max(0, cos(m, -v̂))`` over the last dimension (keepdim), in fp32; 1 <= s <= 2."""
    m_hat = F.normalize(m.float(), dim=-1, eps=eps)
    v_hat = F.normalize(v.float(), dim=-1, eps=eps)
    return 1.0 + (-(m_hat * v_hat).sum(dim=-1, keepdim=True)).clamp_min(0.0)


def _rotate(m: torch.Tensor, v_hat: torch.Tensor, lam: float, eps: float = EPS) -> torch.Tensor:
    """``m' = ‖m‖ · normalize(m̂ + λ s v̂)`` with a unit ``v_hat`` (fp32 in, fp32 out)."""
    norm = m.norm(dim=-1, keepdim=True)
    m_hat = m / norm.clamp_min(eps)
    s = 1.0 + (-(m_hat * v_hat).sum(dim=-1, keepdim=True)).clamp_min(0.0)
    return norm * F.normalize(m_hat + lam * s * v_hat, dim=-1, eps=eps)


def steer_mlp_output(m: torch.Tensor, v: torch.Tensor, lam: float, eps: float = EPS) -> torch.Tensor:
    """Spec step 3 (``mode="mlp"``): ``m' = ‖m‖ · normalize(m̂ + λ · s · v̂)``, s = 1 + max(0, cos(m, -v̂)).

    Computed in fp32 over the last dimension (``v`` broadcasts against ``m``), cast back to ``m``'s dtype.
    ‖m'‖ = ‖m‖ and cos(m', v) >= cos(m, v).

    >>> steer_mlp_output(torch.tensor([-3.0, 4.0]), torch.tensor([2.0, 0.0]), 0.5)
    tensor([1.2127, 4.8507])
    """
    v_hat = F.normalize(v.float(), dim=-1, eps=eps)
    return _rotate(m.float(), v_hat, lam, eps).to(m.dtype)


def steer_residual(h: torch.Tensor, v: torch.Tensor, lam: float, eps: float = EPS) -> torch.Tensor:
    """Spec step 4 (``mode="residual"``, paper Eqs. 5-6): ``h̃ = h + λ v``, ``h ← h̃ · ‖h‖ / ‖h̃‖`` (raw v).

    >>> steer_residual(torch.tensor([-3.0, 4.0]), torch.tensor([2.0, 0.0]), 0.5)
    tensor([-2.2361,  4.4721])
    """
    hf = h.float()
    tilde = hf + lam * v.float()
    scale = hf.norm(dim=-1, keepdim=True) / tilde.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (tilde * scale).to(h.dtype)


def augment_logits(f: torch.Tensor, window_logits: Iterable[torch.Tensor], gamma: float) -> torch.Tensor:
    """Spec step 5: ``f' = f + γ · (mean_k S_k - f)`` in fp32, cast back to ``f``'s dtype.

    ``window_logits`` are the S_k (for k = L-1 that is ``f`` itself); exact when the mean equals ``f``.

    >>> augment_logits(torch.tensor([2.0, 0.0, -1.0]),
    ...                [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, -2.0])], 0.3)
    tensor([ 1.5500,  0.3000, -1.0000])
    """
    total: torch.Tensor | None = None
    count = 0
    for s in window_logits:
        s = s.to(device=f.device, dtype=torch.float32)
        total = s.clone() if total is None else total.add_(s)
        count += 1
    if total is None:
        raise ValueError("augment_logits needs at least one window logit tensor")
    base = f.float()
    return (base + gamma * (total / count - base)).to(f.dtype)


def prompt_mask(mask: Any, width: int) -> Any:
    """The prefill's attention mask restricted to the prompt's ``width`` keys (a static cache's 2-D or 4-D
    mask spans the whole cache); other masks (None, dicts) are returned unchanged."""
    if isinstance(mask, torch.Tensor) and mask.dim() in (2, 4) and mask.shape[-1] > width:
        return mask[..., :width]
    return mask


def padding_of(mask: Any, batch: int, width: int) -> torch.Tensor | None:
    """bool [B, T] (True = real token) from a prefill mask: a 2-D padding mask as is; a 4-D mask (bool =
    may attend, float = 0 where allowed) from its last query row, which sees every real prompt token."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and tuple(mask.shape) == (batch, width):
        return mask.bool()
    if mask.dim() == 4 and mask.shape[-1] == width and mask.shape[0] in (1, batch):
        allowed = mask if mask.dtype == torch.bool else mask == 0
        return allowed[:, 0, -1, :].expand(batch, width)
    return None


# ---------------------------------------------------------------------------------------------------
# the method


@register
class VISTA(Method):
    name = "vista"
    description = (
        "VISTA (Li et al., ICML 2025): steer every layer towards its with-image minus without-image state "
        "(VSV, strength lam) and mix in logits read from the blocks below the last (SLA, weight gamma)."
    )
    stage = "residual"
    needs_image_tokens = True  # per instance: only when VSV is on

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

    def __init__(self, params: Any, adapter: Adapter, state: dict[str, Any]) -> None:
        super().__init__(params, adapter, state)
        self._key = ("vista", id(self))
        self.needs_image_tokens = self.vsv_on  # type: ignore[misc]  # instance override of the ClassVar
        self._negative_rows = VHR(VHR.Params(), adapter, {})  # VHR's no-image rows and text-only positions

    # ---- parameters -------------------------------------------------------------------------------
    @property
    def vsv_on(self) -> bool:
        return bool(self.params.enable_vsv) and self.params.lam > 0

    @property
    def sla_on(self) -> bool:
        return bool(self.params.enable_sla) and self.params.gamma > 0

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def window(self) -> tuple[int, int]:
        return resolve_window(self.params.window, self.num_layers)

    def check(self) -> None:
        check_window(self.params.window, self.num_layers)

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

    def edits(self) -> list[Edit]:
        p = self.params
        last = self.num_layers - 1
        self.state.clear()
        self.state.update(
            vsv=self.vsv_on,
            sla=self.sla_on,
            mode=p.mode,
            lam=p.lam,
            gamma=p.gamma,
            window=list(self.window) if self.sla_on else None,
            final_norm=p.final_norm,
            num_layers=self.num_layers,
        )
        out: list[Edit] = []
        if self.vsv_on:
            out.append(ModuleHook(module=lambda a: a.text_model, fn=self._before_text_model, pre=True))
            for layer in range(self.num_layers):
                out.append(
                    ModuleHook(
                        # mypy cannot infer the type of a lambda that binds the loop variable as a default
                        module=lambda a, layer=layer: a.decoder_layers[layer],  # type: ignore[misc]
                        fn=self._block_hook(layer),
                        in_aux=True,
                    )
                )
            if p.mode == "mlp":
                for layer in range(self.num_layers):
                    out.append(
                        ModuleHook(
                            # mypy cannot infer the type of a lambda that binds the loop variable as a default
                            module=lambda a, layer=layer: a.decoder_layers[layer].mlp,  # type: ignore[misc]
                            fn=self._mlp_hook(layer),
                        )
                    )
        if self.sla_on:
            start, end = self.window
            out.append(ModuleHook(module=lambda a: a.model, fn=self._before_model, pre=True))
            for layer in range(start, min(end, last - 1) + 1):
                out.append(
                    ModuleHook(
                        # mypy cannot infer the type of a lambda that binds the loop variable as a default
                        module=lambda a, layer=layer: a.decoder_layers[layer],  # type: ignore[misc]
                        fn=self._window_hook(layer),
                    )
                )
            out.append(LogitsTransform(fn=self._mix_logits))
        return out

    # ---- per-call state ---------------------------------------------------------------------------
    def _shared(self, ectx: EditContext) -> dict[str, Any]:
        """State of this call (one `generate` or forward): reset at every prefill with the context."""
        return ectx.forward.scratch.setdefault(self._key, {})

    # ---- steps 1-2: auxiliary passes and the vector -------------------------------------------------
    def negative_inputs(self, ectx: EditContext, padding: torch.Tensor | None = None) -> dict[str, Any]:
        """Text-model inputs of the negative rows: the prompt without image tokens (Qwen: with its vision
        delimiters), embedded, re-padded on the left, with text-only positions (VHR's no-image branch).
        ``padding`` [B, T] (True = real token) stands in when the call's context has no 2-D mask (a static
        cache hands the model a 4-D mask)."""
        ctx = ectx.forward
        ids = ctx.prompt_ids
        if padding is not None and ids is not None and tuple(padding.shape) == tuple(ids.shape):
            if ctx.padding_mask is None or tuple(ctx.padding_mask.shape) != tuple(ids.shape):
                ectx = dataclasses.replace(
                    ectx, forward=dataclasses.replace(ctx, padding_mask=padding.bool())
                )
        return self._negative_rows.no_image_branch({}, ectx)

    def _before_text_model(
        self, module: torch.nn.Module, args: tuple, kwargs: dict, ectx: EditContext
    ) -> None:
        if ectx.phase != "prefill":
            return None
        shared = self._shared(ectx)
        if shared.get("vsv_started"):
            return None
        shared["vsv_started"] = True
        positive = {k: kwargs[k] for k in _AUX_KEYS if kwargs.get(k) is not None}
        if args and "inputs_embeds" not in positive:  # positional input_ids
            positive.setdefault("input_ids", args[0])
        reference = positive.get("inputs_embeds", positive.get("input_ids"))
        if reference is None:  # pragma: no cover - the text model always gets embeddings or ids
            return None
        batch, width = reference.shape[:2]
        # a static cache's mask spans the whole cache: keep the prompt's keys
        if "attention_mask" in positive:
            positive["attention_mask"] = prompt_mask(positive["attention_mask"], width)
        padding = padding_of(positive.get("attention_mask"), batch, width)
        if padding is None and ectx.forward.padding_mask is not None:
            padding = padding_of(ectx.forward.padding_mask, batch, width)
        pos_last = last_positions(padding).to(reference.device) if padding is not None else None
        pos_len = padding.long().sum(dim=1) if padding is not None else torch.full((batch,), width)

        with ectx.runtime.disabled(), torch.no_grad():
            pos = self._run_aux(module, positive, pos_last, shared)
            negative = self.negative_inputs(ectx, padding)
            # the negative rows are left padded: index -1 is the last token
            neg = self._run_aux(module, negative, None, shared)
        missing = [layer for layer in range(self.num_layers) if layer not in pos or layer not in neg]
        if missing:  # pragma: no cover - every block runs in both passes
            raise RuntimeError(f"vista: the auxiliary passes did not reach layer(s) {missing}")
        vectors = [steering_vector(pos[layer], neg[layer]) for layer in range(self.num_layers)]
        shared["v"] = vectors
        shared["v_hat"] = [F.normalize(v, dim=-1, eps=EPS) for v in vectors]
        self._record(vectors, pos_len, negative["attention_mask"].long().sum(dim=1))
        return None

    def _run_aux(
        self,
        module: torch.nn.Module,
        inputs: dict[str, Any],
        last: torch.Tensor | None,
        shared: dict[str, Any],
    ) -> dict[int, torch.Tensor]:
        shared["aux"] = {"last": last, "h": {}}
        try:
            module(**inputs, use_cache=False)
            return shared["aux"]["h"]
        finally:
            shared["aux"] = None

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

    # ---- block hooks: capture in the aux passes; steps 3-4 in the real pass ------------------------
    def _block_hook(self, layer: int):
        residual = self.params.mode == "residual"

        def hook(module: torch.nn.Module, args: tuple, output: Any, ectx: EditContext) -> Any:
            bypassed = ectx.runtime.bypassed
            if not (bypassed or residual):
                return None  # mlp mode: the block hook only captures inside the auxiliary passes
            shared = self._shared(ectx)
            hidden = output[0] if isinstance(output, tuple) else output
            if bypassed:
                aux = shared.get("aux")
                if aux is None:
                    return None  # another method's auxiliary pass
                last = aux["last"]
                at = (
                    hidden[:, -1]
                    if last is None
                    else hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
                )
                aux["h"][layer] = at.to(torch.float32, copy=True)
                return None
            v = self._vector(shared, "v", layer, hidden.shape[0])
            if v is None:
                return None
            steered = steer_residual(hidden, v[:, None, :], self.params.lam)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def _mlp_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any, ectx: EditContext) -> Any:
            m = output[0] if isinstance(output, tuple) else output
            v_hat = self._vector(self._shared(ectx), "v_hat", layer, m.shape[0])
            if v_hat is None:
                return None
            steered = _rotate(m.float(), v_hat[:, None, :], self.params.lam).to(m.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    @staticmethod
    def _vector(shared: dict[str, Any], key: str, layer: int, rows: int) -> torch.Tensor | None:
        vectors = shared.get(key)
        if vectors is None:
            return None  # the prefill ran with VISTA disabled: nothing to steer with in this call
        v = vectors[layer]
        if v.shape[0] != rows:
            raise RuntimeError(
                f"vista: steering vectors were computed for {v.shape[0]} rows but this step has {rows}; the batch "
                "must keep its rows between the prefill and the decode steps"
            )
        return v

    # ---- step 5: SLA ----------------------------------------------------------------------------------
    def _before_model(self, module: torch.nn.Module, args: tuple, kwargs: dict, ectx: EditContext) -> None:
        self._shared(ectx)["keep"] = kwargs.get("logits_to_keep", 0)
        return None

    def _window_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any, ectx: EditContext) -> None:
            shared = self._shared(ectx)
            hidden = output[0] if isinstance(output, tuple) else output
            keep = shared.get("keep", 0)
            if isinstance(keep, int):
                kept = hidden if keep == 0 else hidden[:, -keep:].clone()
            else:  # a tensor of positions, as transformers' slice_indices
                kept = hidden[:, keep.to(hidden.device)]
            shared.setdefault("window_h", {})[layer] = kept
            return None

        return hook

    def _mix_logits(self, f: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        shared = self._shared(ectx)
        if shared.get("projecting"):
            return None  # re-entered from our own window projection
        states: dict[int, torch.Tensor] = shared.pop("window_h", {})
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
                yield f if k == last else self._project(states[k], shared, ectx)

        return augment_logits(f, window_logits(), self.params.gamma)

    def _project(self, hidden: torch.Tensor, shared: dict[str, Any], ectx: EditContext) -> torch.Tensor:
        """``S_k = lm_head(N(h_k))`` in the model dtype, under the re-entrancy guard (every edit off)."""
        shared["projecting"] = True
        try:
            with ectx.runtime.disabled():
                x = self.adapter.final_norm(hidden) if self.params.final_norm else hidden
                return self.adapter.lm_head(x)
        finally:
            shared["projecting"] = False
