"""What an edit callback receives: tensors and facts of the current call, never a module or the runtime.

* :class:`ForwardFacts` — one forward call of the model (a prefill or one decode step): phase, positions,
  padding, the prompt and its :class:`~steer.edits.facts.ImageLayout`. Positions are *sequence indices*
  (== key index in a dynamic KV cache, left padding included), never RoPE positions.
* :class:`CallStore` — what lives for one call (a ``generate`` or a direct forward, from its prefill on):
  values collected by :class:`~steer.edits.kinds.Collect`, published artifacts, per-method memos.
* :class:`EditContext` — the view an edit's callable gets: the two above, the model's
  :class:`~steer.edits.facts.ModelInfo`, the layer, the query/key lengths inside attention and the run
  (``"main"`` or an auxiliary :class:`~steer.edits.kinds.SourceRun`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from steer.edits.facts import ImageLayout, ModelInfo

A = TypeVar("A")
T = TypeVar("T")


@dataclass
class CallStore:
    """Per-call state shared by the edits of one call (reset at every prefill).

    ``collected[(owner, name)][layer]``: what a :class:`~steer.edits.kinds.Collect` stored; ``artifacts``:
    published artifacts by type; ``memo[owner]``: a dict private to one method for this call;
    ``scratch[edit id]``: a dict private to one edit for this call; ``backend``: the installers' own per-call
    state (never read by methods).
    """

    collected: dict[tuple[str, str], dict[int | None, Any]] = field(default_factory=dict)
    artifacts: dict[type, Any] = field(default_factory=dict)
    memo: dict[str, dict[Any, Any]] = field(default_factory=dict)
    scratch: dict[int, dict[str, Any]] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)


@dataclass
class ForwardFacts:
    """What the current forward call is about.

    - ``phase``: ``"prefill"`` (empty cache) or ``"decode"``;
    - ``past_length``: keys already in the cache before this call; the call's query rows are the
      sequence indices ``past_length .. past_length + query_len - 1``;
    - ``prompt_ids`` [B, T]: the prompt of the current call (kept across decode steps);
    - ``image_layout``: where each image's tokens are (None when unknown, e.g. ``inputs_embeds`` only);
      ``image_mask`` [B, T] bool and ``image_spans`` (per row, ``(start, end)`` per image) derive from it;
    - ``padding_mask`` [B, L] bool: the 2-D attention mask of this call (True = real token);
    - ``inputs``: the other model inputs of the prefill (``image_grid_thw``, ``image_sizes``...);
    - ``logits_to_keep``: which positions ``lm_head`` projects in this call (0 = all);
    - ``generation``: the decoding settings when the call runs inside ``generate`` (``do_sample``,
      ``num_beams``, ``num_return_sequences``), else None;
    - ``call``: the :class:`CallStore` of the call this forward belongs to.
    """

    phase: str = "prefill"
    batch_size: int = 0
    query_len: int = 0
    past_length: int = 0
    prompt_ids: torch.Tensor | None = None
    image_layout: ImageLayout | None = None
    padding_mask: torch.Tensor | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    logits_to_keep: Any = 0
    generation: dict[str, Any] | None = None
    forward_index: int = 0
    call: CallStore = field(default_factory=CallStore)
    derived: dict[Any, Any] = field(default_factory=dict, repr=False)

    def per_forward(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per forward (every layer asks the same): ``derived`` is emptied at each forward."""
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]

    @property
    def is_prefill(self) -> bool:
        return self.phase == "prefill"

    @property
    def image_mask(self) -> torch.Tensor | None:
        return None if self.image_layout is None else self.image_layout.mask

    @property
    def image_spans(self) -> list[list[tuple[int, int]]] | None:
        return None if self.image_layout is None else self.image_layout.spans

    @property
    def scratch(self) -> dict[Any, Any]:
        """Per-call scratch space of low-level edits (kept for user edits written against it)."""
        return self.call.memo.setdefault("", {})

    def query_positions(self, device: torch.device | None = None) -> torch.Tensor:
        """Sequence indices of this call's query rows, [Lq]."""
        return torch.arange(self.past_length, self.past_length + self.query_len, device=device)

    def key_offset(self, key_len: int) -> int:
        """The sequence index of key 0 of an attention call with ``key_len`` keys: 0 when the keys cover the
        sequence from its start (a full cache; a static cache, whose empty slots follow); ``past + query_len -
        key_len`` when they are fewer (a sliding-window layer's cache keeps only the last keys, in order)."""
        return max(0, self.past_length + self.query_len - key_len)

    def align_keys(self, values: torch.Tensor, key_len: int, fill: Any = 0) -> torch.Tensor:
        """Per-sequence-position values [B, L] (L = the prompt, or more) as the ``key_len`` keys of this call
        see them (:meth:`key_offset`); positions past L get ``fill`` (decoded keys)."""
        offset = self.key_offset(key_len)
        end = offset + key_len
        length = values.shape[1]
        if end > length:
            pad = torch.full((values.shape[0], end - length), fill, dtype=values.dtype, device=values.device)
            values = torch.cat([values, pad], dim=1)
        return values[:, offset:end]

    def key_image_mask(self, key_len: int, device: torch.device | None = None) -> torch.Tensor | None:
        """Image-token flags for ``key_len`` keys (decoded keys are never image tokens), [B, key_len]; on a
        sliding-window layer the keys are the last ones (:meth:`key_offset`)."""
        if self.image_mask is None:
            return None
        return self.per_forward(("key_image_mask", key_len, device), lambda: self._key_image_mask(key_len, device))

    def _key_image_mask(self, key_len: int, device: torch.device | None) -> torch.Tensor:
        assert self.image_mask is not None
        mask = self.image_mask.to(device) if device is not None else self.image_mask
        return self.align_keys(mask, key_len, False)

    def rows_after_first_image(self, device: torch.device | None = None) -> torch.Tensor | None:
        """bool [B, Lq]: query rows that are text *after* the sample's first image token.

        Prefill: non-image rows whose index is greater than the first image position; decode: every new
        row of a sample that has an image.
        """
        if self.image_mask is None:
            return None
        return self.per_forward(("rows_after_first_image", device), lambda: self._rows_after_first_image(device))

    def _rows_after_first_image(self, device: torch.device | None) -> torch.Tensor:
        assert self.image_mask is not None
        mask = self.image_mask.to(device) if device is not None else self.image_mask
        has_image = mask.any(dim=1)
        first = torch.where(has_image, mask.float().argmax(dim=1), torch.full_like(has_image, 0, dtype=torch.long))
        q = self.query_positions(mask.device)
        after = q[None, :] > first[:, None]
        key_mask = self.key_image_mask(self.past_length + self.query_len, mask.device)
        assert key_mask is not None  # image_mask is set
        is_image = key_mask[:, q]
        return after & ~is_image & has_image[:, None]


@dataclass
class EditContext:
    """What an edit's callable sees when it runs.

    ``forward``: the :class:`ForwardFacts` of this call; ``model``: the model's
    :class:`~steer.edits.facts.ModelInfo`; ``layer``: the decoder (or vision) layer; ``query_len`` /
    ``key_len``: set inside attention; ``run``: ``"main"`` or the name of the auxiliary run this is part of;
    ``owner``: the method the edit belongs to (scopes :meth:`memo`, :meth:`collected`).
    """

    forward: ForwardFacts
    model: ModelInfo | None = None
    layer: int | None = None
    query_len: int | None = None
    key_len: int | None = None
    run: str = "main"
    owner: str = ""
    edit_id: int = 0

    @property
    def phase(self) -> str:
        return self.forward.phase

    @property
    def padding(self) -> torch.Tensor | None:
        """bool [B, L]: the real tokens of this call (None: no padding information)."""
        return self.forward.padding_mask

    @property
    def image(self) -> ImageLayout | None:
        return self.forward.image_layout

    @property
    def scratch(self) -> dict[str, Any]:
        """A dict private to this edit for the current call."""
        return self.forward.call.scratch.setdefault(self.edit_id, {})

    @property
    def memo(self) -> dict[Any, Any]:
        """A dict private to this edit's method for the current call (shared by the method's edits)."""
        return self.forward.call.memo.setdefault(self.owner, {})

    def once(self, key: Any, compute: Callable[[], T]) -> T:
        """``compute()`` the first time ``key`` is asked for in this call (per method), the stored value after."""
        memo = self.memo
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def collected(self, name: str, layer: int | None = None, default: Any = None) -> Any:
        """What this method's :class:`~steer.edits.kinds.Collect` named ``name`` stored for ``layer`` in this
        call (``layer=None`` for a site without layers), or ``default``."""
        return self.forward.call.collected.get((self.owner, name), {}).get(layer, default)

    def collected_layers(self, name: str) -> dict[int | None, Any]:
        """Everything this method's Collect named ``name`` stored in this call, by layer."""
        return self.forward.call.collected.get((self.owner, name), {})

    def take(self, name: str) -> dict[int | None, Any]:
        """Remove and return what this method's Collect ``name`` stored in this call (by layer)."""
        return self.forward.call.collected.pop((self.owner, name), {})

    def artifact(self, kind: type[A]) -> A | None:
        """The artifact of type ``kind`` published in this call, or None."""
        return self.forward.call.artifacts.get(kind)

    def publish(self, artifact: Any) -> None:
        """Make ``artifact`` available to the consumers of its type for the rest of this call."""
        self.forward.call.artifacts[type(artifact)] = artifact


__all__ = ["CallStore", "EditContext", "ForwardFacts"]
