"""Backends install edits on a target: `steer.backends.transformers` (vision-language models) and
`steer.backends.diffusers` (Stable Diffusion pipelines). Both hand out the same handle
(`steer.backends.lifecycle.Steering`) and implement :class:`Backend`, which `steer.api` talks to.
"""

from __future__ import annotations

from typing import Any, Protocol


class Backend(Protocol):
    """What `steer.apply` needs from a backend."""

    kind: str  # the Method.target it serves: "vlm" or "pipeline"

    def adapter(self, target: Any) -> Any:
        """The family adapter of ``target``; raises UnsupportedModelError naming the supported classes."""

    def families(self) -> tuple[str, ...]:
        """Every family this backend supports."""

    def info(self, adapter: Any) -> Any:
        """The facts methods see (no modules)."""

    def active_methods(self, target: Any) -> dict[str, Any]:
        """Method name -> the handle that has it active on ``target``."""

    def check(self, adapter: Any, edits: list[Any], methods: list[Any]) -> None:
        """Refuse edits the target cannot take (typed errors), before anything is installed."""

    def handle(
        self,
        target: Any,
        adapter: Any,
        edits: list[Any],
        params: dict[str, dict[str, Any]],
        state: dict[str, Any],
        methods: list[Any],
    ) -> Any:
        """A new (not yet installed) handle for ``edits``."""


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline (it has a UNet, or a transformer and a scheduler)."""
    return hasattr(obj, "unet") or hasattr(obj, "transformer") and hasattr(obj, "scheduler")


def backend_for(target: Any) -> Backend:
    """The backend that steers ``target`` (imported on first use: diffusers only for pipelines)."""
    if is_pipeline(target):
        from steer.backends.diffusers import BACKEND as pipeline_backend

        return pipeline_backend
    from steer.backends.transformers import BACKEND as model_backend

    return model_backend


__all__ = ["Backend", "backend_for", "is_pipeline"]
