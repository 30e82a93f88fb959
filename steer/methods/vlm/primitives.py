"""Generic methods that expose single edits by name (no paper behind them).

They make the low-level edit API reachable from the front door, recipes and the CLI, and serve as
small, fully specified interventions for tests and the demo:

- ``scale_heads``: A_{l,i} <- alpha * A_{l,i} for chosen heads i in chosen layers (the VHR edit with
  fixed heads);
- ``image_attention``: in chosen layers, text query rows after the image give their image tokens
  ``scale`` times their attention mass, renormalised:
  alpha'_qj = c_{g(j)} alpha_qj / sum_k c_{g(k)} alpha_qk with c = scale on image keys, 1 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from steer.edits.kinds import Edit, GroupReweight, HeadScale
from steer.errors import InvalidParameterError
from steer.registry import Method, param, register


def _check_layers(method: str, layers: list[int] | None, num_layers: int) -> None:
    for layer in layers or []:
        if not -num_layers <= layer < num_layers:
            raise InvalidParameterError(
                f"{method}: layer {layer} does not exist; the model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1}, or negative from the end)"
            )


@register
class ScaleHeads(Method):
    name = "scale_heads"
    description = "Multiply chosen attention heads' outputs by alpha in chosen layers (edit: HeadScale)."
    stage = "attention"

    @dataclass
    class Params:
        alpha: float = param(2.0, help="factor on the chosen heads' outputs", range=(0.0, 100.0))
        heads: list[int] | None = param(None, help="query-head indices; None = every head")
        layers: list[int] | None = param(None, help="decoder layer indices; None = every layer")

    def check(self) -> None:
        _check_layers(self.name, self.params.layers, self.model.num_layers)
        for head in self.params.heads or []:
            if not 0 <= head < self.model.num_heads:
                raise InvalidParameterError(
                    f"scale_heads: head {head} does not exist; the model has {self.model.num_heads} query heads "
                    f"(valid: 0..{self.model.num_heads - 1})"
                )

    def is_noop(self) -> bool:
        return self.params.alpha == 1.0 or self.params.heads == []

    def edits(self) -> list[Edit]:
        p = self.params
        return [HeadScale(layers=p.layers if p.layers is not None else "all", scale=p.alpha, heads=p.heads)]


@register
class ImageAttention(Method):
    name = "image_attention"
    description = (
        "Scale the attention that text after the image gives to image tokens, renormalised "
        "(edit: GroupReweight over the image-token group)."
    )
    stage = "attention"
    needs_image_tokens = True

    @dataclass
    class Params:
        scale: float = param(2.0, help="factor on the attention mass given to image tokens", range=(0.0, 100.0))
        layers: list[int] | None = param(None, help="decoder layer indices; None = every layer")

    def check(self) -> None:
        _check_layers(self.name, self.params.layers, self.model.num_layers)

    def is_noop(self) -> bool:
        return self.params.scale == 1.0

    def edits(self) -> list[Edit]:
        p = self.params
        return [
            GroupReweight(
                layers=p.layers if p.layers is not None else "all",
                coefficients=[1.0, p.scale],
                groups="image",
                rows="after_image",
                renormalize=True,
            )
        ]
