"""Typed errors of the public API. Every message says what to do next."""

from __future__ import annotations


class SteerError(Exception):
    """Base class of every error steer raises on purpose."""


class UnsupportedModelError(SteerError, TypeError):
    """The model (or pipeline) class has no steer adapter."""


class UnknownMethodError(SteerError, KeyError):
    """A method or recipe name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidParameterError(SteerError, ValueError):
    """An unknown parameter name, a value of the wrong type or out of its range."""


class MissingImageTokensError(SteerError, ValueError):
    """A method that works on image tokens got a prompt without any."""


class SteerInputError(SteerError, ValueError):
    """A pipeline call or method input steer cannot honour: a word not in the prompt (the message lists the
    prompt's tokens), a word split into several tokens, an unsupported call argument or scheduler."""


class AlreadySteeredError(SteerError, RuntimeError):
    """The same method is already active on this model."""


class SteeringRemovedError(SteerError, RuntimeError):
    """A handle was used after `remove()`."""


class ConcurrentSteeringError(SteerError, RuntimeError):
    """A handle was applied or removed while the model runs in another thread."""


class ImageLayoutError(SteerError, ValueError):
    """The image tokens of a prompt cannot be laid out as the grids a method needs (placeholders and images do
    not match, a grid the family cannot give, a chunked prefill that splits an image)."""


class VisionPruningError(SteerError, ValueError):
    """Visual tokens cannot be pruned for this call: the prompt's image placeholders do not match the images,
    or the inputs cannot be shortened."""


class IncompatibleMethodsError(SteerError, ValueError):
    """Methods that cannot run together as given: one requires an artifact nobody provides, or relies on a fact
    that another method's artifact invalidates without reading the artifact."""


class EvalInputError(SteerError, ValueError):
    """Unusable evaluation input: a missing file, a malformed record, an unknown option or id."""


class DecodingModeError(SteerError, ValueError):
    """A method (or one of its options) that needs another decoding mode than the call uses: a sampling-only
    option under greedy decoding, a beam-search method without beams or with sampling, an output the method's
    decoding loop cannot give."""
