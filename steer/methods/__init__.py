"""Built-in methods: declarations over `steer.edits` (parameters, edits(), pure math). Importing this package
registers them: `steer.methods.vlm` (vision-language models) and `steer.methods.diffusion` (pipelines)."""

from steer.methods import diffusion, vlm  # noqa: F401
