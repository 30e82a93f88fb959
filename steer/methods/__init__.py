"""Built-in methods. Importing this package registers them."""

from steer.methods import primitives  # noqa: F401
