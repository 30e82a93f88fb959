"""Typed artifacts: what one method computes for another, declared and checked instead of passed on the side.

A method declares the artifact types it ``provides`` and ``consumes`` (`steer.registry.Method`). At run time
the provider's edits publish an instance into the call's store and consumers read it with
``ctx.artifact(Type)`` (`steer.edits.context.EditContext`). `steer.apply` checks a set of methods up front:
a consumer runs after its provider; an artifact that ``invalidates`` a fact (e.g. pruning removes image tokens,
so the image grid no longer holds) is refused beside a method that ``uses`` that fact without consuming the
artifact. No method names another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from steer.edits.facts import ImageBlock


class Artifact:
    """Base class of artifacts. ``invalidates``: facts (names) that no longer hold once it is published."""

    invalidates: ClassVar[tuple[str, ...]] = ()


@dataclass
class KeptBlock:
    """The kept tokens of one stock image block (:class:`~steer.edits.facts.ImageBlock`, image-relative).

    ``kept``: their indices inside the block (raster order, newline slots included), increasing;
    ``sent_start``: where they start in the image's run of sent tokens. A block whose ``grid`` is None is
    not a stock grid (e.g. LLaVA-NeXT tiles in FasterVLM's spatial layout).
    """

    block: ImageBlock
    sent_start: int
    kept: torch.Tensor


@dataclass
class PrunedImage:
    """One image after visual-token pruning: ``sent`` tokens reach the language model instead of ``stock``;
    ``offsets`` [sent]: each sent token's index in the image's stock run; ``blocks``: the stock blocks and
    which of their tokens were kept; ``record``: the pruning method's per-image record (its state)."""

    sent: int
    stock: int
    offsets: torch.Tensor
    blocks: list[KeptBlock] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunedLayout(Artifact):
    """Visual tokens were pruned before the language model (FasterVLM provides it; CCA consumes it).

    ``images``: per row of the un-expanded batch, its pruned images in prompt order; ``origin`` [B, L']:
    each token's column in the caller's (unpruned) row, -1 for new padding; ``positions``: ``"original"``
    (the language model sees the stock position of every kept token) or ``"contiguous"``.
    """

    invalidates: ClassVar[tuple[str, ...]] = ("image_grid",)

    images: list[list[PrunedImage]]
    origin: torch.Tensor
    positions: str = "contiguous"


__all__ = ["Artifact", "KeptBlock", "PrunedImage", "PrunedLayout"]
