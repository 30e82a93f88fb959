"""Coefficient rules (placeholder during the redesign: the registry lands in its own step)."""

from steer.kernels.triton_group import CoefficientRule

__all__ = ["CoefficientRule"]
