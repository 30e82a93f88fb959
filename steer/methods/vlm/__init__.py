"""Methods for vision-language models (importing this package registers them)."""

from steer.methods.vlm import (  # noqa: F401
    cca,
    fastervlm,
    opera,
    pai,
    primitives,
    var,
    vcd,
    vhr,
    vista,
)
