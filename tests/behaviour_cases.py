"""The stored behaviour fixture: what every method does on every family, before and after a refactor.

Each case is a method (or a composition) on a tiny zoo model at its defaults and at one strong setting, run
on a batch of 3 prompts of different lengths with left padding (sdpa). Stored per case: the logits of the
last ``LAST`` positions of every row, the log-sum-exp and argmax of every position, the real-token mask and
8 greedy tokens. Pipeline methods store the latents after 4 denoising steps on the tiny SD.

Regenerate (only when a behaviour change is intended, and say so in the commit):

    HF_HUB_OFFLINE=1 python tests/behaviour_cases.py        # writes tests/data/behaviour_fixture.pt

`tests/test_behaviour_fixture.py` compares the current code against the stored file: tokens exactly,
tensors to ``ATOL`` in fp32.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).parent / "data" / "behaviour_fixture.pt"
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
LAST = 4
NEW_TOKENS = 8
ATOL = 1e-6
SINK_CHANNEL = 5

#: case name -> (method spec, parameters). ``var`` cases run with planted sinks (random models have none).
VLM_CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "scale_heads/default": ("scale_heads", {}),
    "scale_heads/strong": ("scale_heads", {"alpha": 4.0, "heads": [0, 1], "layers": [1, 2]}),
    "image_attention/default": ("image_attention", {}),
    "image_attention/strong": ("image_attention", {"scale": 6.0, "layers": [1, 2, 3]}),
    "var/default": ("var", {"sink_dims": [SINK_CHANNEL], "tau": 4.0}),
    "var/strong": ("var", {"sink_dims": [SINK_CHANNEL], "tau": 4.0, "p": 0.1, "rho": 0.0, "min_visual_mass": 0.0}),
    "vhr/default": ("vhr", {}),
    "vhr/strong": ("vhr", {"alpha": 6.0, "layers": [0, 1, 2, 3], "branch": "lockstep"}),
    "cca/default": ("cca", {}),
    "cca/strong": ("cca", {"mrope": "ring_all", "next_blocks": "all"}),
    "fastervlm/default": ("fastervlm", {}),
    "fastervlm/strong": ("fastervlm", {"reduction": 0.5, "positions": "original"}),
    "vista/default": ("vista", {}),
    "vista/strong": ("vista", {"lam": 0.6, "gamma": 0.8, "mode": "residual", "final_norm": True}),
    "fastervlm+cca": (["fastervlm", "cca"], {"fastervlm": {"reduction": 0.5}}),
    "fastervlm+cca/original": (
        ["fastervlm", "cca"],
        {"fastervlm": {"reduction": 0.5, "positions": "original"}, "cca": {"mrope": "ring_all"}},
    ),
    "fastervlm+var": (["fastervlm", "var"], {"fastervlm": {"reduction": 0.5}, "var": {"sink_dims": [SINK_CHANNEL], "tau": 4.0}}),
    "var+vhr+vista": (
        ["var", "vhr", "vista"],
        {"var": {"sink_dims": [SINK_CHANNEL], "tau": 4.0, "p": 0.3}, "vhr": {"alpha": 3.0}, "vista": {"lam": 0.3}},
    ),
}

SD_PROMPT = "a cat and a dog"
SD_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "astar/default": ("astar", {"tokens": ["cat", "dog"]}),
    "astar/strong": ("astar", {"tokens": ["cat", "dog"], "step_size": 60.0, "w_ret": 3.0}),
    "attend_and_excite/default": ("attend_and_excite", {"tokens": ["cat", "dog"]}),
    "attend_and_excite/strong": (
        "attend_and_excite",
        {"tokens": ["cat", "dog"], "step_size": 60.0, "thresholds": {0: 0.9, 2: 0.95}},
    ),
    "detector_guidance/default": ("detector_guidance", {"objects": ["a cat", "a dog"], "first_attempt": 0.25}),
    "detector_guidance/strong": (
        "detector_guidance",
        {"objects": ["a cat", "a dog"], "beta": 3.0, "first_attempt": 0.25, "cam_threshold": 0.2, "cam_min_area": 0.0},
    ),
}


class _PlantSinks:
    """After decoder layer 1, channel ``SINK_CHANNEL`` += 100·RMS at each row's first real token and its 1st and
    3rd image tokens (plain torch hooks, independent of steer; as tests/test_var.py does)."""

    def __init__(self, model: torch.nn.Module, image_token_id: int) -> None:
        self.model = model
        self.image_token_id = image_token_id
        self.where: torch.Tensor | None = None
        self.handles: list[Any] = []

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] <= 1:
            return
        mask = kwargs.get("attention_mask")
        out = torch.zeros(ids.shape, dtype=torch.bool)
        first = mask.long().argmax(1) if mask is not None else torch.zeros(ids.shape[0], dtype=torch.long)
        out[torch.arange(ids.shape[0]), first] = True
        image = ids == self.image_token_id
        rank = image.long().cumsum(1)
        self.where = out | (image & ((rank == 1) | (rank == 3)))

    def _add(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.where is None or hidden.shape[1] != self.where.shape[1]:
            return None
        rms = hidden.float().pow(2).mean(-1).sqrt()
        rms = torch.where(rms > 0, rms, torch.ones_like(rms))
        hidden = hidden.clone()
        hidden[..., SINK_CHANNEL] += (100.0 * rms * self.where.to(hidden.device)).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __enter__(self) -> _PlantSinks:
        layers = self.model.model.language_model.layers
        self.handles = [
            self.model.register_forward_pre_hook(self._capture, with_kwargs=True),
            layers[1].register_forward_hook(self._add),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def _uses_var(spec: Any) -> bool:
    return spec == "var" or (isinstance(spec, list) and "var" in spec)


def run_vlm_case(family: str, name: str) -> dict[str, torch.Tensor]:
    """The outputs of one VLM case on one family (a fresh tiny model, loaded through the real path)."""
    import contextlib

    import steer
    from steer import zoo

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import batch_inputs

    spec, params = VLM_CASES[name]
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    plant = _PlantSinks(model, int(model.config.image_token_id)) if _uses_var(spec) else contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CCA's stock-weights warning
        with plant, steer.apply(model, spec, **params), torch.no_grad():
            logits = model(**inputs).logits.float()
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    width = logits.shape[1]
    mask = inputs["attention_mask"].bool()
    real = mask[:, -width:] if mask.shape[1] >= width else torch.ones(logits.shape[:2], dtype=torch.bool)
    return {
        "logits_last": logits[:, -LAST:].contiguous(),
        "lse": torch.logsumexp(logits, dim=-1),
        "argmax": logits.argmax(-1),
        "real": real,
        "tokens": out[:, inputs["input_ids"].shape[1] :].contiguous(),
    }


def run_sd_case(name: str) -> dict[str, torch.Tensor]:
    import steer
    from steer import zoo

    method, params = SD_CASES[name]
    pipe = zoo.load_tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    with steer.apply(pipe, method, **params) as handle:
        generator = torch.Generator().manual_seed(0)
        target = getattr(handle, "pipe", pipe)
        latents = target(
            SD_PROMPT, num_inference_steps=4, generator=generator, output_type="latent", guidance_scale=7.5
        ).images
    return {"latents": latents.float().contiguous()}


def all_cases() -> list[str]:
    return [f"{family}:{name}" for family in FAMILIES for name in VLM_CASES] + [f"sd:{name}" for name in SD_CASES]


def run(case: str) -> dict[str, torch.Tensor]:
    family, name = case.split(":", 1)
    return run_sd_case(name) if family == "sd" else run_vlm_case(family, name)


def main() -> None:
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("STEER_ZOO_DIR", tempfile.mkdtemp(prefix="steer-zoo-"))
    torch.manual_seed(0)
    results = {}
    for case in all_cases():
        torch.manual_seed(0)
        results[case] = run(case)
        print(case, {k: tuple(v.shape) for k, v in results[case].items()}, flush=True)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(results, FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e6:.2f} MB, {len(results)} cases)")


if __name__ == "__main__":
    main()
