"""FasterVLM efficiency: prefill time, decode time per token and KV-cache size, pruned vs unpruned.

Builds a tiny-but-not-trivial LLaVA-1.5 from configs (random weights, no network): CLIP 336/14 -> 576 visual
tokens (narrow: width 128, 4 layers), a Llama text decoder with hidden 512 and 8 layers. One prompt of
``text + 576 image tokens + text``; for each reduction in one run:

* prefill: ``model(**inputs, use_cache=True)`` (vision tower, [CLS] scoring, projector, LLM prefill);
* decode per token: M greedy single-token forward steps on that prefill's cache, divided by M;
* KV cache: bytes of the keys and values the prefill leaves in the cache.

Settings are interleaved in every round (the first round is a warm-up) and the best time per setting is
kept, so a shared, noisy CPU affects all settings alike. Printed as ratios to the unpruned model.

    python benchmarks/pruning.py                # reductions 0.75 0.9 0.95
    python benchmarks/pruning.py --threads 1 --repeats 5 --new-tokens 16
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import steer

IMAGE_TOKEN = 999


def build(seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 shaped model: CLIP 336/14 (576 tokens + CLS), Llama hidden 512 x 8 layers."""
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        patch_size=14,
        image_size=336,
        projection_dim=128,
    )
    text = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    model.config._attn_implementation = "sdpa"
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 1, None
    return model


def make_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 900, (batch, 12), generator=g)
    after = torch.randint(3, 900, (batch, 40), generator=g)
    image = torch.full((batch, 576), IMAGE_TOKEN)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), before, image, after], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 336, 336, generator=g),
    }


def kv_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_once(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, float]:
    """One prefill (timed) and ``new_tokens`` greedy decode steps on its cache (timed together)."""
    device = inputs["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    out = model(**inputs, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - start
    cache = out.cache
    kv = kv_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        step = model(input_ids=token, cache=cache, use_cache=True)
        cache = step.cache
        token = step.logits[:, -1:].argmax(-1)
    _sync(device)
    decode = (time.perf_counter() - start) / new_tokens
    return {"seq": float(out.logits.shape[1]), "prefill": prefill, "decode": decode, "kv": float(kv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.75, 0.9, 0.95])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = build().to(device)
    inputs = {k: v.to(device) for k, v in make_inputs(args.batch).items()}
    print(
        f"LLaVA-1.5-shaped model: CLIP 336/14 (576 visual tokens, width 128, 4 layers), Llama hidden 512 x 8 layers; "
        f"batch {args.batch}, prompt {inputs['input_ids'].shape[1]} tokens, {args.new_tokens} decode steps, "
        f"best of {args.repeats} (settings interleaved), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU thread(s), device {device}"
    )
    settings: list[float | None] = [None, *args.reductions]
    runs: dict[float | None, list[dict[str, float]]] = {r: [] for r in settings}
    kept: dict[float | None, int] = {None: 576}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for r in settings:
            if r is None:
                runs[r].append(measure_once(model, inputs, args.new_tokens))
                continue
            with steer.apply(model, "fastervlm", reduction=r) as handle:
                runs[r].append(measure_once(model, inputs, args.new_tokens))
                kept[r] = handle.state["fastervlm"]["samples"][0][0]["T"]
    best = {
        r: {key: min(m[key] for m in results[1:]) for key in results[0]} for r, results in runs.items()
    }
    base = best[None]

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    header = (
        f"{'setting':<16}{'T':>5}{'seq':>6}{'prefill ms':>12}{'ratio':>8}{'decode ms/tok':>15}{'ratio':>8}"
        f"{'KV MiB':>9}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in settings:
        m = best[r]
        name = "unpruned" if r is None else f"reduction {r:g}"
        print(
            f"{name:<16}{kept[r]:>5}{int(m['seq']):>6}{m['prefill'] * 1e3:>12.1f}{ratio(m['prefill'], base['prefill']):>8.3f}"
            f"{m['decode'] * 1e3:>15.2f}{ratio(m['decode'], base['decode']):>8.3f}"
            f"{m['kv'] / 2**20:>9.2f}{ratio(m['kv'], base['kv']):>8.3f}"
        )


if __name__ == "__main__":
    main()
