"""Built-in methods. Importing this package registers them."""

from steer.methods import (
    cca,  # noqa: F401
    fastervlm,  # noqa: F401
    primitives,  # noqa: F401
    var,  # noqa: F401
    vhr,  # noqa: F401
    vista,  # noqa: F401
)
