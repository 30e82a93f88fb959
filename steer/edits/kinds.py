"""The edit kinds: interventions declared as data.

An *edit* says what to change and where (a site, `steer.edits.sites`); it never touches a model itself. A
backend installs each kind with its own installer and removes it again. Every registered method is a
declaration over these kinds; values that depend on the input (a per-sample head set, a mask built from the
image layout) are callables that receive an :class:`~steer.edits.context.EditContext` at run time.

=======================  =================================  ==============================================
edit                     site                               what it does
=======================  =================================  ==============================================
`AttentionMask`          ``layer.attn.scores``              AND / replace / add a mask to chosen layers
`GroupReweight`          ``layer.attn.scores``              reweight post-softmax attention by key group
`HeadScale`              ``layer.attn.head_out``            o_{l,i} <- s_i * o_{l,i} for chosen heads
`HeadOutputEdit`         ``layer.attn.head_out``            any function of the per-head output [B, Lq, H, d]
`Transform`              ``layer.in/out``, ``layer.mlp.out``  any function of a residual-stream tensor
`ResidualAdd`            ``layer.out``                      h_l <- h_l + v (a `Transform`)
`Collect`                any tensor site                    store (a function of) a tensor for later edits
`ScoreEdit`              ``layer.attn.scores``              explicit pre-softmax scores for a few rows and keys
`SourceRun`              ``lm.inputs``                      an auxiliary pass of the language model (or a branch
                                                            that follows decoding with its own KV cache)
`Positions`              ``lm.inputs``                      new position ids (1-D or M-RoPE) at prefill
`PruneVisionTokens`      ``vision.out``                     keep some visual tokens, drop the rest
`LogitsTransform`        ``logits``                         f <- g(f) on the final logits
`InputEdit`              ``lm.inputs``                      change the language model's keyword arguments
`BeamLookahead`          ``generate``                       a beam search whose step scores a policy sets
`ModuleHook`             (a module path)                    escape hatch: a forward (pre-)hook
`MethodWrap`             (a module path)                    escape hatch: wrap a method of a submodule
=======================  =================================  ==============================================

Runs: an edit acts in the ``runs`` it lists (``"main"``: the caller's own forward; a name: the auxiliary
:class:`SourceRun` of the same method). Phases: ``"prefill"``, ``"decode"`` or ``"all"``.

Example, no method involved::

    from steer import edits
    h = steer.apply(model, [edits.HeadScale(layers=[1], heads=[0, 2], scale=2.0),
                            edits.ResidualAdd(layers=[0], vector=v)])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

import torch

from steer.edits.context import EditContext

if TYPE_CHECKING:
    from steer.edits.artifacts import PrunedLayout

LayerSelection = Union[Sequence[int], Literal["all"]]
Phase = Literal["prefill", "decode", "all"]
MAIN = "main"


class Edit:
    """Base class of every edit.

    ``site``: where it acts (`steer.edits.sites`); ``stage`` orders composition (input, vision, attention,
    residual, logits); ``phase`` and ``runs`` say when it acts. ``owner`` is set by `steer.apply` to the
    method the edit belongs to (it scopes the edit's memo and collected values); raw edits get ``""``.
    """

    site: str  # a class constant of each kind, or a field where a kind has several sites
    stage: ClassVar[str] = "attention"
    phase: Phase = "all"
    runs: tuple[str, ...] = (MAIN,)
    owner: str = ""

    def active(self, run: str, phase: str) -> bool:
        """Whether the edit acts in ``run`` at ``phase``."""
        return run in self.runs and (self.phase == "all" or self.phase == phase)

    def active_in(self, phase: str) -> bool:
        return self.phase == "all" or self.phase == phase


def layers_of(selection: LayerSelection, num_layers: int) -> list[int]:
    """Sorted decoder layer indices of a selection (``"all"`` or ints, negative from the end).

    Raises ``ValueError`` for a layer out of range or a value that is not an int.
    """
    if isinstance(selection, str):
        if selection != "all":
            raise ValueError(f"layers must be a list of ints or 'all', got {selection!r}")
        return list(range(num_layers))
    out = []
    for layer in selection:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer indices must be ints, got {layer!r}")
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {num_layers} decoder layers")
        out.append(index)
    return sorted(set(out))


class LayerEdit(Edit):
    """An edit on chosen decoder layers (``layers``: ints or ``"all"``)."""

    layers: LayerSelection

    def resolve_layers(self, num_layers: int) -> list[int]:
        return layers_of(self.layers, num_layers)


class AttentionEdit(LayerEdit):
    """An edit that runs inside steer's attention function for chosen decoder layers."""

    stage: ClassVar[str] = "attention"


TensorOrFn = Union[torch.Tensor, float, Callable[[EditContext], Union[torch.Tensor, float, None]]]


def evaluate(value: TensorOrFn, ectx: EditContext) -> Any:
    """A constant stays as is; a callable is called with the edit context."""
    return value(ectx) if callable(value) else value


# --------------------------------------------------------------------------------------------------
# attention


@dataclass
class HeadOutputEdit(AttentionEdit):
    """Apply ``fn(out, ectx) -> out`` to the attention output of each chosen layer.

    ``out`` is the per-head output softmax(QK^T/sqrt(d)) V of shape [B, Lq, H, D], i.e. the input of
    ``o_proj`` split by head. Returning ``None`` leaves it unchanged.
    """

    site: str = field(default="layer.attn.head_out", init=False, repr=False)

    layers: LayerSelection
    fn: Callable[[torch.Tensor, EditContext], torch.Tensor | None]
    phase: Phase = "all"
    runs: tuple[str, ...] = (MAIN,)

    def apply(self, out: torch.Tensor, ectx: EditContext) -> torch.Tensor:
        new = self.fn(out, ectx)
        return out if new is None else new


@dataclass
class HeadScale(AttentionEdit):
    """Scale chosen heads' outputs: A_{l,i} <- s_i * A_{l,i} before the output projection.

    ``scale`` is a float (applied to ``heads``, all heads when ``heads`` is None), a tensor of shape
    [H] or [B, H], or a callable returning one of those (or None for "no change this call").
    """

    site: str = field(default="layer.attn.head_out", init=False, repr=False)

    layers: LayerSelection
    scale: TensorOrFn
    heads: Sequence[int] | None = None
    phase: Phase = "all"

    def scales(self, ectx: EditContext, num_heads: int, batch: int, device: Any, dtype: Any) -> torch.Tensor | None:
        value = evaluate(self.scale, ectx)
        if value is None:
            return None
        if not isinstance(value, torch.Tensor):
            s = torch.ones(num_heads, dtype=torch.float32)
            if self.heads is None:
                s[:] = float(value)
            else:
                s[list(self.heads)] = float(value)
            value = s
        value = value.to(device=device, dtype=torch.float32)
        if value.dim() == 1:
            value = value.expand(batch, -1)
        if value.shape != (batch, num_heads):
            raise ValueError(f"HeadScale: scale must have shape [H]={num_heads} or [B, H], got {tuple(value.shape)}")
        return value

    def apply(self, out: torch.Tensor, ectx: EditContext) -> torch.Tensor:
        s = self.scales(ectx, out.shape[2], out.shape[0], out.device, out.dtype)
        if s is None:
            return out
        return (out.float() * s[:, None, :, None]).to(out.dtype)


MaskMode = Literal["and", "or", "replace", "add"]


@dataclass
class AttentionMask(AttentionEdit):
    """Add a mask to chosen layers' attention.

    ``mask`` (tensor or callable of the edit context) broadcasts to [B, H, Lq, Lk]:
    - ``mode="and"``: boolean, True = may attend; ANDed with the model's own mask (causal, padding, sliding
      window, Gemma 3's bidirectional images);
    - ``mode="or"``: boolean, True = may attend as well; ORed into the model's own mask (lets keys in that the
      model hides, e.g. CCA's outer-ring keys after the query); everything else keeps the model's mask;
    - ``mode="replace"``: boolean, replaces the model's mask entirely (the model's structure is lost: prefer
      ``"and"`` / ``"or"``, which compose with it);
    - ``mode="add"``: float, added to the pre-softmax scores (use ``torch.finfo(dtype).min``, not -inf).
    Mask edits of one layer apply in apply order. ``None`` from a callable means "no change for this call".
    """

    site: str = field(default="layer.attn.scores", init=False, repr=False)

    layers: LayerSelection
    mask: TensorOrFn
    mode: MaskMode = "and"
    phase: Phase = "all"

    def __post_init__(self) -> None:
        if self.mode not in ("and", "or", "replace", "add"):
            raise ValueError(f"AttentionMask.mode must be 'and', 'or', 'replace' or 'add', got {self.mode!r}")


Groups = Union[Literal["image"], Callable[[EditContext], torch.Tensor]]
Rows = Union[Literal["all", "after_image", "new"], Callable[[EditContext], Union[torch.Tensor, None]], None]


@dataclass
class GroupReweight(AttentionEdit):
    """Reweight post-softmax attention by key group (DESIGN.md, "Attention math").

    Keys are labelled 0..G per sample (0 = every other key). With the group masses
    m_g = sum_{j in g} alpha_qj = exp(lse_g - lse_all) and the group outputs out_g (attention restricted
    to g), the edited output of an eligible query row is

        o' = sum_g c_g * m_g * out_g            (divided by sum_g c_g * m_g when ``renormalize``)

    ``groups``: ``"image"`` (group 1 = the sample's image tokens) or a callable returning labels
    [B, L_prompt] (decoded keys get label 0). ``coefficients``: a list of G+1 floats, or a callable
    ``(masses [B, H, Lq, G+1], ectx) -> c`` broadcastable to it. ``rows``: which query rows are edited:
    ``"all"``, ``"after_image"`` (prefill: text rows after the sample's first image token; decode: the
    new rows), ``"new"`` (decode rows only) or a callable returning bool [B, Lq]. ``impl`` is handed to
    `steer.kernels.dispatch.reweighted_attention`: ``"auto"``/``"fused"`` (LSE merge) or ``"reference"``
    (materialised probabilities; tests and tiny shapes), ``"triton"`` (single-pass kernel, needs a rule).
    ``rule``: the same coefficients as a registered `steer.kernels.rules.CoefficientRule` (or a callable of the
    edit context returning one or None) that the Triton kernel evaluates in its epilogue; ``"auto"`` uses
    it on CUDA. A list of ``coefficients`` is its own rule (the ``"constant"`` rule).
    """

    site: str = field(default="layer.attn.scores", init=False, repr=False)

    layers: LayerSelection
    coefficients: Sequence[float] | Callable[[torch.Tensor, EditContext], torch.Tensor]
    groups: Groups = "image"
    rows: Rows = "all"
    renormalize: bool = False
    phase: Phase = "all"
    impl: Literal["auto", "fused", "reference", "triton"] = "auto"
    rule: Any = None


# --------------------------------------------------------------------------------------------------
# residual stream


class TensorEdit(LayerEdit):
    """An edit that rewrites one tensor at a per-layer site: ``apply(x, ectx) -> x' | None``.

    ``positions``: ``"all"`` (prompt and generated tokens), ``"prompt"`` (prefill only) or ``"new"``
    (decode steps only).
    """

    stage: ClassVar[str] = "residual"
    positions: Literal["all", "prompt", "new"] = "all"

    def apply(self, x: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        raise NotImplementedError

    def acts_at(self, phase: str) -> bool:
        if self.positions == "prompt":
            return phase == "prefill"
        if self.positions == "new":
            return phase == "decode"
        return True


@dataclass
class Transform(TensorEdit):
    """``x <- fn(x, ectx)`` at ``site`` (``"layer.in"``, ``"layer.out"`` or ``"layer.mlp.out"``) of chosen layers.

    ``x`` is [B, T, D] in the model's dtype; returning None leaves it unchanged.
    """

    site: str
    layers: LayerSelection
    fn: Callable[[torch.Tensor, EditContext], torch.Tensor | None]
    positions: Literal["all", "prompt", "new"] = "all"
    phase: Phase = "all"
    runs: tuple[str, ...] = (MAIN,)

    def __post_init__(self) -> None:
        if self.site not in ("layer.in", "layer.out", "layer.mlp.out"):
            raise ValueError(f"Transform.site must be 'layer.in', 'layer.out' or 'layer.mlp.out', got {self.site!r}")

    def apply(self, x: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        return self.fn(x, ectx)


@dataclass
class ResidualAdd(TensorEdit):
    """Add a vector to the residual stream at the output of chosen decoder layers: h_l <- h_l + v_l.

    ``vector``: tensor [D] or [B, D] (same for every chosen layer), or a callable of the edit context
    (``ectx.layer`` is set) returning one of those or None. ``positions``: ``"all"`` (prompt and
    generated tokens), ``"prompt"`` (prefill only) or ``"new"`` (decode steps only).
    """

    site: str = field(default="layer.out", init=False, repr=False)

    layers: LayerSelection
    vector: TensorOrFn
    positions: Literal["all", "prompt", "new"] = "all"

    def apply(self, x: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        vector = evaluate(self.vector, ectx)
        if vector is None:
            return None
        vector = vector.to(device=x.device, dtype=x.dtype)
        if vector.dim() == 2:  # [B, D]
            vector = vector[:, None, :]
        return x + vector


# --------------------------------------------------------------------------------------------------
# reading and auxiliary passes


Select = Literal["all", "last", "kept"]


@dataclass
class Collect(LayerEdit):
    """Store (a function of) the tensor at ``site`` for later edits of the same method in this call.

    ``fn(x, ectx) -> value`` (default: ``x`` itself) runs on the tensor after ``select``: ``"all"``
    positions, each row's ``"last"`` real token ([B, ...] instead of [B, T, ...]), or the positions
    ``lm_head`` projects (``"kept"``, for ``layer.logits``). Read it back with
    ``ectx.collected(name, layer)``. ``layers`` is ignored for sites without layers (``"logits"``: stored under
    layer None).

    Two sites are read-only views the other kinds do not have: ``"logits"`` (the final logits of the run, e.g.
    of an auxiliary :class:`SourceRun` branch, [B, T', V]) and ``"layer.attn.probs"`` (the post-softmax
    attention probabilities of the call's query rows, [B, H, Lq, Lk] fp32, computed explicitly for those rows
    only; the layer's output is untouched); ``"layer.attn.probs.edited"`` is the same after the layer's mask edits
    and :class:`GroupReweight` (the probabilities the layer's output is made of: a picture of what a method did).
    """

    stage: ClassVar[str] = "residual"

    name: str
    site: str
    layers: LayerSelection = "all"
    fn: Callable[[torch.Tensor, EditContext], Any] | None = None
    select: Select = "all"
    phase: Phase = "all"
    runs: tuple[str, ...] = (MAIN,)

    def __post_init__(self) -> None:
        allowed = (
            "layer.in", "layer.out", "layer.mlp.out", "layer.attn.head_out", "layer.attn.probs",
            "layer.attn.probs.edited", "layer.logits",
            "layer.logits.normed", "logits",
        )  # fmt: skip
        if self.site not in allowed:
            raise ValueError(f"Collect.site must be one of {', '.join(allowed)}, got {self.site!r}")
        if self.select not in ("all", "last", "kept"):
            raise ValueError(f"Collect.select must be 'all', 'last' or 'kept', got {self.select!r}")


SourceInputs = Union[Literal["same", "text_only", "distorted"], tuple[str, ...]]
BranchBatch = Literal["auto", "batched", "sequential"]


@dataclass
class SourceRun(Edit):
    """An auxiliary pass of the language model: once per prefill, before the caller's own, or, with ``follow``,
    a branch that runs beside every forward of the call with its own KV cache.

    ``inputs``: ``"same"`` (the prefill's own language-model inputs: embeddings, mask, positions),
    ``"text_only"`` (the prompt without its image tokens, re-padded on the left, with text-only positions:
    the adapter's fact), ``"distorted"`` (the prefill's own inputs with each image's features recomputed from
    ``distort(pixels)``: the tower and projector run on the distorted pixels once per image), or a tuple of
    those stacked along the batch (rows of each part, the later parts left padded to the first's width). The
    pass runs without gradients, with every edit off except the ones that list this run's ``name`` in their
    ``runs`` (e.g. a :class:`Collect`; ``Collect(site="logits")`` reads the branch's final logits).

    ``follow=True`` (one part): the branch follows decoding. At the prefill it runs its inputs into its own
    cache; at each later forward of the call it runs the same new tokens (their embeddings), with its own mask
    (its prompt's padding, then the call's mask over the generated tokens) and positions (its prompt's next
    positions; the call's own positions for ``"same"``/``"distorted"``), and its cache follows every beam
    reorder of the call's cache (``reorder=False``: it does not, a known bug some official code has). Its
    logits are those of the positions the call projects (``"text_only"``: each row's last position).
    ``batch``: ``"batched"`` runs the branch's rows in the caller's forward (one forward of 2B rows, the
    caller's cache holding both branches; edits of the caller act on its own rows only), ``"sequential"`` runs
    a separate forward per call, ``"auto"`` batches where the call allows it (a dynamic cache, 2-D masks).
    Both give the same logits (to float rounding).

    ``distort(pixels) -> pixels``: one image's preprocessed pixels in the adapter's per-image layout
    ([S, C, H, W]: S = 1 for LLaVA-1.5, the crops of a LLaVA-NeXT image, the patches of a Qwen image with its
    temporal copies folded), called once per image in processor order.
    """

    site: str = field(default="lm.inputs", init=False, repr=False)
    stage: ClassVar[str] = "input"

    name: str
    inputs: SourceInputs = "same"
    phase: Phase = "prefill"
    follow: bool = False
    distort: Callable[[torch.Tensor], torch.Tensor] | None = None
    batch: BranchBatch = "auto"
    reorder: bool = True

    def __post_init__(self) -> None:
        parts = self.parts()
        if self.batch not in ("auto", "batched", "sequential"):
            raise ValueError(f"SourceRun.batch must be 'auto', 'batched' or 'sequential', got {self.batch!r}")
        if "distorted" in parts and self.distort is None:
            raise ValueError("SourceRun(inputs='distorted') needs distort=callable(pixels) -> pixels")
        if self.follow and len(parts) != 1:
            raise ValueError(f"SourceRun(follow=True) takes one kind of inputs, got {self.inputs!r}")

    def parts(self) -> tuple[str, ...]:
        parts = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        bad = [p for p in parts if p not in ("same", "text_only", "distorted")]
        if bad or not parts:
            raise ValueError(
                f"SourceRun.inputs: use 'same', 'text_only', 'distorted' or a tuple of them, got {self.inputs!r}"
            )
        return parts

    @property
    def aligned(self) -> bool:
        """The branch's positions are the caller's (``"same"``/``"distorted"``): logits compare position by position."""
        return all(p != "text_only" for p in self.parts())


KeySelection = Union[Literal["image"], Callable[[EditContext], Union[torch.Tensor, None]]]
RowSelection = Union[Literal["last"], Callable[[EditContext], Union[torch.Tensor, None]]]


@dataclass
class ScoreEdit(AttentionEdit):
    """Explicit pre-softmax scores for a few query rows: ``a_j <- fn(a, ectx)_j`` for the selected keys j.

    ``a_j = scale * q·k_j + bias_j`` (the masked score of key j; masked keys stay masked). For the ``rows`` it
    selects (``"last"``: each row's last real query position of the call, i.e. the row that predicts the next
    token; or a callable returning bool [B, Lq], None = no change), the scores of the ``keys`` it selects
    (``"image"``: the prompt's image tokens; or a callable returning bool [B, <= Lk]) are computed explicitly
    ([B, H, R, K] fp32, R rows and K keys per batch row, padded slots masked) and replaced by ``fn(a, ectx)``
    (same shape; only the allowed entries are used). The other keys keep their scores; then softmax and ·V. The
    fused path merges the two parts by log-sum-exp (the fused kernel over the other keys, the explicit block
    over the selected ones); ``impl="reference"`` materialises the whole score row (tests).
    """

    site: str = field(default="layer.attn.scores", init=False, repr=False)

    layers: LayerSelection
    fn: Callable[[torch.Tensor, EditContext], torch.Tensor]
    keys: KeySelection = "image"
    rows: RowSelection = "last"
    phase: Phase = "all"
    impl: Literal["fused", "reference"] = "fused"


# --------------------------------------------------------------------------------------------------
# inputs, vision, logits


@dataclass
class Positions(Edit):
    """New position ids for the prompt: ``fn(positions, ectx) -> positions`` at prefill.

    ``positions`` are the model's own ids for the prompt (after any pruning): [B, T] for 1-D RoPE, [3, B, T]
    for M-RoPE (t, h, w); ``ectx.padding`` marks the real tokens and ``ectx.image`` holds the image layout.
    Decoded tokens keep the shift of each row's last prompt token (1-D: added to their ids; M-RoPE: the
    model's ``rope_deltas`` are recomputed as ``max position + 1 - real tokens``).
    """

    site: str = field(default="lm.inputs", init=False, repr=False)
    stage: ClassVar[str] = "input"

    fn: Callable[[torch.Tensor, EditContext], torch.Tensor | None]
    phase: Phase = "prefill"


@dataclass
class PruneVisionTokens(Edit):
    """Keep some of each image's visual tokens and drop the rest before the language model.

    ``keep(scores [N], valid [N] bool | None) -> LongTensor``: the kept token indices of one image (or crop)
    from its visual-token scores (``score``: ``"auto"`` = what the tower supports, ``"cls"`` = the [CLS]
    row, ``"received"`` = mean received attention, computed at vision layer ``layer``; None = the family's
    default). ``positions``: ``"contiguous"`` (ordinary positions of the shorter sequence) or ``"original"``
    (each kept token keeps its stock position; M-RoPE models always do). ``layout``: ``"stock"`` or
    ``"spatial"`` (LLaVA-NeXT packing of the kept crop tokens). The prompt is shortened to the kept tokens
    (re-padded on the left); ``generate`` returns the caller's prompt followed by the new tokens. Publishes a
    :class:`~steer.edits.artifacts.PrunedLayout` for the call; ``on_pruned(layout)`` is called with it.
    """

    site: str = field(default="vision.out", init=False, repr=False)
    stage: ClassVar[str] = "vision"

    keep: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    score: Literal["auto", "cls", "received"] = "auto"
    layer: int | None = None
    positions: Literal["contiguous", "original"] = "contiguous"
    layout: Literal["stock", "spatial"] = "stock"
    on_pruned: Callable[[PrunedLayout], None] | None = None


@dataclass
class LogitsTransform(Edit):
    """Change the final logits: f <- fn(f, ectx) (the output of ``lm_head``, [B, Lq, V])."""

    site: str = field(default="logits", init=False, repr=False)
    stage: ClassVar[str] = "logits"

    fn: Callable[[torch.Tensor, EditContext], torch.Tensor | None]


@dataclass
class InputEdit(Edit):
    """Change the language model's forward keyword arguments before it runs.

    ``fn(kwargs, ectx) -> kwargs | None`` sees ``position_ids``, ``attention_mask``, ``inputs_embeds``...
    (the call into the language model), prefill and decode.
    """

    site: str = field(default="lm.inputs", init=False, repr=False)
    stage: ClassVar[str] = "input"

    fn: Callable[[dict[str, Any], EditContext], dict[str, Any] | None]


# --------------------------------------------------------------------------------------------------
# decoding


@dataclass
class BeamStep:
    """What a :class:`BeamPolicy` sees at one step of one sample's beam search (nb running beams).

    - ``step``: tokens generated so far (this step picks token ``step``); ``prompt_len``: P, the padded prompt
      length (generated token g sits at sequence index P + g);
    - ``logits`` [nb, V] fp32: the raw next-token logits of each running beam (before logits processors);
    - ``candidates`` [nb, C]: each beam's top-C tokens of ``logits``;
    - ``rows`` [nb, C, P + step + 1] or None: the attention row of each candidate placed after its beam (the
      policy's layer, max over query heads, divided by its sum over keys); None when the policy did not ask;
    - ``history`` (list of [nb, P + g + 1], g < step): the same rows of the tokens each running beam generated
      (its lineage);
    - ``image_keys`` [P] bool: the sample's image-token positions; ``sample``/``batch_size``: which sample of
      how many.
    """

    step: int
    prompt_len: int
    logits: torch.Tensor
    candidates: torch.Tensor
    rows: torch.Tensor | None
    history: list[torch.Tensor]
    image_keys: torch.Tensor
    sample: int = 0
    batch_size: int = 1


class BeamPolicy:
    """The method's side of a :class:`BeamLookahead` search for one sample (one instance per sample and call).

    The backend runs the model and the stock beam bookkeeping; the policy decides the candidates' scores and
    when to roll back. Default: plain beam search over the candidates.
    """

    def needs_rows(self, step: int) -> bool:
        """Whether step ``step`` needs the candidates' attention rows (a look-ahead forward)."""
        return False

    def scores(self, view: BeamStep) -> torch.Tensor:
        """The candidates' scores y [nb, C] in logit units (``-inf`` drops a candidate); the backend takes
        ``log_softmax`` over the candidates (every other token ``-inf``), runs the logits processors and adds
        the running beam scores."""
        return view.logits.gather(1, view.candidates)

    def rollback(self, step: int) -> int | None:
        """Checked after :meth:`scores` at step ``step``: the earlier step to redo (<= ``step``), or None."""
        return None

    def restore(self, step: int) -> None:
        """A rollback to ``step`` happened: forget what was recorded after it."""

    def redone(self, step: int) -> None:
        """Step ``step`` was redone (full vocabulary, the earlier choices at that step banned, no policy scores)."""


@dataclass
class BeamLookahead(Edit):
    """Replace ``generate``'s beam search by one whose step scores a policy sets (``model.generate`` stays the
    caller's only call; removed again by ``remove()``).

    Per sample (one beam loop per sample after a joint prefill) and step: each running beam's top
    ``candidates`` tokens of its raw logits; when the policy asks, a look-ahead forward gives each candidate's
    attention row at decoder layer ``layer`` (``lookahead="tree"``: one forward of nb·C query tokens, each seeing
    its beam's cache and itself, whose logits and K/V are kept for the chosen candidates; ``"sequential"``: C
    one-token forwards, each cropped off the cache again); the policy's scores -> ``log_softmax`` over the
    candidates -> the call's logits processors -> the stock beam bookkeeping (finished hypotheses, length
    penalty, early stopping). A rollback (policy) restores the beams, finished hypotheses and rows of an
    earlier step, replays the cache from the prompt and redoes that step over the full vocabulary with the
    tokens chosen there in every earlier pass banned. ``policy(batch_size)`` makes the policy of each sample of
    one call (``policy(batch_size)(sample)``), ``on_done(policies)`` is called when the call ends.
    """

    site: str = field(default="generate", init=False, repr=False)
    stage: ClassVar[str] = "logits"

    policy: Callable[[int], Callable[[int], BeamPolicy]]
    candidates: int = 5
    layer: int = -1
    lookahead: Literal["tree", "sequential"] = "tree"
    on_done: Callable[[list[BeamPolicy]], None] | None = None

    def __post_init__(self) -> None:
        if self.lookahead not in ("tree", "sequential"):
            raise ValueError(f"BeamLookahead.lookahead must be 'tree' or 'sequential', got {self.lookahead!r}")
        if self.candidates < 1:
            raise ValueError(f"BeamLookahead.candidates must be >= 1, got {self.candidates}")


# --------------------------------------------------------------------------------------------------
# escape hatches (for users; built-in methods do not use them)


@dataclass
class ModuleHook(Edit):
    """A forward hook (or pre-hook) on a submodule named by a dotted path.

    ``fn`` follows PyTorch's hook signatures with the edit context appended:
    forward hook ``fn(module, args, output, ectx) -> output | None``;
    pre-hook (``pre=True``, kwargs included) ``fn(module, args, kwargs, ectx) -> (args, kwargs) | None``.
    ``in_aux=True``: the hook also runs inside auxiliary runs (``ectx.run`` says which).
    ``prepend=True``: run before the hooks already on the module.
    ``module`` may also be a callable of the model's root module returning the submodule.
    """

    stage: ClassVar[str] = "residual"

    module: str | Callable[[torch.nn.Module], torch.nn.Module]
    fn: Callable[..., Any]
    pre: bool = False
    in_aux: bool = False
    prepend: bool = False


@dataclass
class MethodWrap(Edit):
    """Wrap a method of a submodule while installed: ``module.name(*args, **kwargs)`` returns
    ``fn(original, args, kwargs, ectx)``, where ``original`` is the callable it replaces (the bound
    method, or an earlier wrap of it: wraps of one method chain in ``apply`` order).

    Installed as an instance attribute of the module and removed again on ``remove()``. With every edit
    disabled the wrapper calls ``original`` directly.
    """

    stage: ClassVar[str] = "input"

    module: str | Callable[[torch.nn.Module], torch.nn.Module]
    name: str
    fn: Callable[..., Any]


__all__ = [
    "MAIN",
    "AttentionEdit",
    "AttentionMask",
    "BeamLookahead",
    "BeamPolicy",
    "BeamStep",
    "Collect",
    "Edit",
    "GroupReweight",
    "HeadOutputEdit",
    "HeadScale",
    "InputEdit",
    "LayerEdit",
    "LayerSelection",
    "LogitsTransform",
    "MethodWrap",
    "ModuleHook",
    "Positions",
    "PruneVisionTokens",
    "ResidualAdd",
    "ScoreEdit",
    "SourceRun",
    "TensorEdit",
    "Transform",
    "evaluate",
    "layers_of",
]
