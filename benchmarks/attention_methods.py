"""Overhead of the attention methods on a small LLaVA built from configs (random weights, offline). Not a test.

    /work/venv/bin/python benchmarks/attention_methods.py [--device cpu|cuda] [--new-tokens 16] [--repeats 3] [--clock auto|wall|cpu]

The model: LLaVA-1.5 layout with a Llama text decoder (hidden 512, 8 layers, 8 heads), a 1-layer CLIP tower at
336 px / patch 14 (576 image tokens) and a prompt of BOS + 32 text tokens + 576 image tokens + 448 text tokens
(1057 tokens), batch 1, fp32 (bf16 on CUDA), ``attn_implementation="sdpa"``. Random models have no massive
activations, so a hook after decoder layer 1 plants them (channel ``SINK_CHANNEL`` += 200·RMS at BOS and 4
image tokens) in every run, steered or not; VAR then finds them with its default τ = 20 (z ≤ sqrt(512) ≈ 22.6).

Printed, all from one run (medians over ``--repeats``, variants interleaved):
* prefill time and greedy decode time per token (a manual loop over the KV cache, each step timed), as
  ratios to the unsteered model, and the number of (head, row) pairs VAR selected in the prefill + decode;
* for methods with an eager reference (``REFERENCE``): fused / reference ratios;
* peak memory of one prefill above what is held before it: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
  a dispatch-level tracker of the bytes of live tensors that aten ops allocate (views and in-place results
  are not counted twice; tracemalloc cannot see torch's CPU allocator).

Add a method: one entry in ``METHODS`` (name -> `steer.apply` keyword arguments), and in ``REFERENCE`` if it
has an ``impl="reference"`` variant.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from memory import peak_bytes  # noqa: E402  (benchmarks/memory.py)
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

import steer  # noqa: E402
from steer.adapters import adapter_for  # noqa: E402

SINK_CHANNEL = 7
IMAGE_TOKEN = 1000
VISUAL_SINK_RANKS = (1, 100, 300, 500)

#: method name -> `steer.apply` keyword arguments.
METHODS: dict[str, dict[str, Any]] = {
    "var": {"sink_dims": [SINK_CHANNEL], "tau": 20.0},
    "vhr": {"alpha": 2.0},
    "cca": {"trained_checkpoint": True},
}
#: method name -> the extra keyword arguments of its eager-reference variant.
REFERENCE: dict[str, dict[str, Any]] = {
    "var": {"impl": "reference"},
}


# --------------------------------------------------------------------------------------------------
# model and inputs


def build(
    device: str, dtype: torch.dtype, pre_text: int = 32, post_text: int = 448
) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(0)
    text = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        patch_size=14,
        image_size=336,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    model.config.text_config._attn_implementation = "sdpa"
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 1, 2
    g = torch.Generator().manual_seed(1)
    ids = torch.cat(
        [
            torch.tensor([1]),
            torch.randint(3, 1000, (pre_text,), generator=g),
            torch.full((576,), IMAGE_TOKEN),
            torch.randint(3, 1000, (post_text,), generator=g),
        ]
    )[None]
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=g).to(device=device, dtype=dtype),
    }
    return model, inputs


def plant_sinks(model: Any, input_ids: torch.Tensor) -> Any:
    """Forward hook after decoder layer 1: channel SINK_CHANNEL += 200·RMS at BOS and 4 image tokens (prefill)."""
    image = input_ids == IMAGE_TOKEN
    rank = image.long().cumsum(1)
    where = torch.zeros_like(image)
    where[:, 0] = True
    for r in VISUAL_SINK_RANKS:
        where |= image & (rank == r)

    def hook(module: Any, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] != where.shape[1]:
            return None
        rms = hidden.float().pow(2).mean(-1).sqrt()
        hidden = hidden.clone()
        hidden[..., SINK_CHANNEL] += (200.0 * rms * where).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return adapter_for(model).decoder_layers[1].register_forward_hook(hook)


# --------------------------------------------------------------------------------------------------
# measurements


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: the clock: "wall" (time.perf_counter) or "cpu" (this thread's CPU time: with one torch thread on a shared CPU,
#: time the process spent descheduled does not count; the work done does). Set by --clock.
CLOCK = {"fn": time.perf_counter}


def timed(fn: Callable[[], Any], device: str) -> float:
    clock = CLOCK["fn"]
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def prefill_and_decode(
    model: Any, inputs: dict[str, Any], device: str, new_tokens: int
) -> tuple[float, float]:
    """One timed prefill (with cache), then ``new_tokens`` timed greedy decode steps; returns (prefill s, s/token)."""
    out: Any = None

    def prefill() -> None:
        nonlocal out
        out = model(**inputs, use_cache=True)

    t_prefill = timed(prefill, device)
    cache = getattr(out, "past_key_values", None) or out.cache
    token = out.logits[:, -1:].argmax(-1)
    mask = inputs["attention_mask"]
    t_decode = 0.0
    for _ in range(new_tokens):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = {"input_ids": token, "attention_mask": mask, "cache": cache, "use_cache": True}

        def decode(step: dict[str, Any] = step) -> None:
            nonlocal out
            out = model(**step)

        t_decode += timed(decode, device)
        token = out.logits[:, -1:].argmax(-1)
    return t_prefill, t_decode / new_tokens


def measure(
    model: Any, inputs: dict[str, Any], device: str, new_tokens: int, repeats: int
) -> dict[str, dict]:
    variants: dict[str, dict[str, Any] | None] = {"unsteered": None}
    for name, kwargs in METHODS.items():
        variants[name] = {name: kwargs}
        if name in REFERENCE:
            variants[f"{name} (eager reference)"] = {name: {**kwargs, **REFERENCE[name]}}

    samples: dict[str, dict[str, list[float]]] = {v: {"prefill": [], "decode": []} for v in variants}
    results: dict[str, dict] = {v: {} for v in variants}
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first round warms up and measures memory
            for variant, spec in variants.items():
                handle = None
                if spec is not None:
                    ((name, kwargs),) = spec.items()
                    handle = steer.apply(model, name, **kwargs)
                try:
                    t_prefill, t_decode = prefill_and_decode(model, inputs, device, new_tokens)
                    if rep == 0:
                        if handle is not None and name == "var":
                            state = handle.state.get(name, {}).get("samples") or [{}]
                            results[variant]["selected_rows"] = sum(
                                int(e["selected_rows"].sum()) for e in state[0].values()
                            )
                        results[variant]["peak_bytes"] = peak_bytes(lambda: model(**inputs), device)
                finally:
                    if handle is not None:
                        handle.remove()
                if rep > 0:
                    samples[variant]["prefill"].append(t_prefill)
                    samples[variant]["decode"].append(t_decode)
    for variant, s in samples.items():
        results[variant]["prefill_s"] = statistics.median(s["prefill"])
        results[variant]["decode_s_per_token"] = statistics.median(s["decode"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared CPU)")
    parser.add_argument(
        "--clock", choices=("auto", "wall", "cpu"), default="auto",
        help="wall time, or the thread's CPU time (auto: cpu on a CPU with one thread, else wall)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    CLOCK["fn"] = time.thread_time if clock == "cpu" else time.perf_counter
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, inputs = build(args.device, dtype)
    plant = plant_sinks(model, inputs["input_ids"])
    try:
        results = measure(model, inputs, args.device, args.new_tokens, args.repeats)
    finally:
        plant.remove()

    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    )
    n_prompt = inputs["input_ids"].shape[1]
    print(f"steer attention-method benchmark: LLaVA (Llama hidden 512, 8 layers, 8 heads), prompt {n_prompt} tokens "
          f"(576 image), batch 1, {str(dtype).replace('torch.', '')}, sdpa, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, {clock} clock; device: {args.device} ({where}); torch {torch.__version__}")  # fmt: skip
    base = results["unsteered"]
    memory = (
        "peak prefill memory (CUDA max_memory_allocated)"
        if args.device.startswith("cuda")
        else "peak prefill live-tensor bytes"
    )
    header = f"{'variant':<26}{'prefill ms':>11}{'x unsteered':>12}{'decode ms/tok':>14}{'x unsteered':>12}{'peak MB':>10}{'x unsteered':>12}{'selected rows':>15}"
    print(header)
    for variant, r in results.items():
        print(
            f"{variant:<26}{r['prefill_s'] * 1e3:>11.1f}{r['prefill_s'] / base['prefill_s']:>12.2f}"
            f"{r['decode_s_per_token'] * 1e3:>14.2f}{r['decode_s_per_token'] / base['decode_s_per_token']:>12.2f}"
            f"{r['peak_bytes'] / 2**20:>10.1f}{r['peak_bytes'] / max(base['peak_bytes'], 1):>12.2f}"
            f"{r.get('selected_rows', ''):>15}"
        )
    print(f"({memory})")
    for name in METHODS:
        if name not in REFERENCE:
            continue
        fused, ref = results[name], results[f"{name} (eager reference)"]
        print(
            f"{name}: fused / eager reference: prefill {fused['prefill_s'] / ref['prefill_s']:.2f}x, "
            f"decode {fused['decode_s_per_token'] / ref['decode_s_per_token']:.2f}x, "
            f"peak memory {fused['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x"
        )


if __name__ == "__main__":
    main()
