"""The diffusers backend: installs pipeline edits (`steer.edits.pipeline`) on a Stable Diffusion pipeline.

* `families` — the supported pipelines and family names (no diffusers import);
* `adapter` — what a pipeline is: family, variant, ``attn2`` depths, tokenizer → `PipelineInfo`;
* `processors` — the ``attn2`` processor that runs `ProcessorEdit` s (per-layer state in the processor objects);
* `runtime` — one runtime per UNet: install / restore, the UNet hooks, the ``encode_prompt`` wrappers, passes;
* `generation`, `passes` — one pipeline call; one UNet forward steer acts in (a step or a probe);
* `latents` — a `LatentUpdate` on its pipeline; `pipelines` — the from_pipe pipelines that host it;
* `installers` — one installer per pipeline edit kind; `handle` — `PipelineSteering`; `maps` — map grids.

diffusers itself is imported when a pipeline is steered, never by importing this package.
"""

from __future__ import annotations

from typing import Any

from steer.backends.diffusers.families import PIPELINE_FAMILIES, SUPPORTED_PIPELINES
from steer.edits.kinds import Edit


class PipelineBackend:
    """`steer.backends.Backend` for diffusers pipelines."""

    kind = "pipeline"

    def adapter(self, target: Any) -> Any:
        from steer.backends.diffusers.adapter import PipelineAdapter

        return PipelineAdapter.of(target)  # raises UnsupportedModelError naming the supported pipelines

    def families(self) -> tuple[str, ...]:
        return PIPELINE_FAMILIES

    def info(self, adapter: Any) -> Any:
        return adapter.info

    def active_methods(self, target: Any) -> dict[str, Any]:
        from steer.backends.diffusers.runtime import PipelineRuntime

        runtime = PipelineRuntime.of(target.unet)
        return {} if runtime is None else {m: h for h in runtime.handles for m in h.methods}

    def check(self, adapter: Any, edits: list[Edit], methods: list[Any]) -> None:
        from steer.backends.diffusers.installers import check
        from steer.backends.diffusers.installers.latent import check_exclusive
        from steer.backends.diffusers.runtime import PipelineRuntime

        runtime = PipelineRuntime.of(adapter.unet)
        for edit in edits:
            check(adapter, edit, runtime)
        check_exclusive(adapter, edits, runtime)

    def handle(
        self,
        target: Any,
        adapter: Any,
        edits: list[Edit],
        params: dict[str, dict[str, Any]],
        state: dict[str, Any],
        methods: list[Any],
    ) -> Any:
        from steer.backends.diffusers.handle import PipelineSteering
        from steer.edits.pipeline import LatentUpdate

        pipe = adapter.source
        if any(isinstance(e, LatentUpdate) for e in edits):
            from steer.backends.diffusers.pipelines import latent_pipeline_for

            pipe = latent_pipeline_for(adapter.source)
        return PipelineSteering(adapter.source, adapter, edits, params, state, pipe)


BACKEND = PipelineBackend()

__all__ = ["BACKEND", "PIPELINE_FAMILIES", "SUPPORTED_PIPELINES", "PipelineBackend"]
