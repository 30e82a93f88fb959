"""Real widths: every VLM method on the five families of issue 15, at the smallest public checkpoint's widths.

Each family is built from its real config (hidden size, heads, KV heads, head dim, vocabulary, vision width and
heads, image size, patch, merge / pixel-shuffle / pooling, token counts per image, pinpoints) with random
weights and no network, the decoder and the vision tower cut to ``--layers`` / ``--vision-layers`` (2), in
bf16, and run on a real-size image prompt (a 640 x 480 image through the family's processor). For the
unsteered model and each method at its defaults (VAR with a channel given and on a 3-layer decoder, since VAR
edits layers 2..L-1):

* no crash: peak-memory prefill + greedy generation of ``--new-tokens`` tokens;
* acts: the steered generation (tokens or the logits of any step) differs from the unsteered one;
* ``remove()`` exact: after removing, the generated tokens and the logits of every step are bit-identical to
  the unsteered model's;
* prefill ms (start of ``generate`` to its first token: vision tower, prefill forward, first argmax) and decode
  ms per token (between the first and the last token), both stamped inside the one ``generate`` call by a
  stopping criterion; peak prefill memory (``model(**inputs, logits_to_keep=1)``; live tensors on the CPU,
  CUDA's allocator on a GPU); each as a ratio (×) to the unsteered model of the same build.

The unsteered model and the methods are interleaved in each of ``--repeats`` rounds and the best time is
kept, so a shared, noisy CPU affects them alike; ``--threads 1`` times on the thread's CPU clock (``--clock``),
which the other jobs of a shared CPU do not move. A typed refusal (``steer.SteerError``) is reported as the
method's row; any other exception is a crash and stops the run. Exits non-zero when a ``remove()`` is not
exact.

Checkpoints whose widths are used (config values as published on the hub; cut layers noted):

* ``qwen3_vl``: Qwen/Qwen3-VL-2B-Instruct — text 2048 / 16 heads / 8 KV / head 128 / vocab 151936,
  interleaved M-RoPE [24, 20, 20]; vision 1024 / 16 heads, patch 16, merge 2; DeepStack from 3 vision blocks
  (5, 11, 17) -> here the 2 kept blocks (0, 1).
* ``llava_onevision``: llava-hf/llava-onevision-qwen2-0.5b-ov-hf — Qwen2 896 / 14 heads / 2 KV / vocab 151936;
  SigLIP so400m 1152 / 16 heads at 384 / 14 (729 tokens per crop); pinpoints 384..2304; anyres_max_9.
* ``gemma3``: google/gemma-3-4b-it — text 2560 / 8 heads / 4 KV / head 256 / vocab 262208, window 1024 (the 2
  kept layers: one sliding, one full); SigLIP 1152 / 16 heads at 896 / 14, 256 tokens per crop; pan-and-scan.
* ``internvl``: OpenGVLab/InternVL3-1B-hf — InternViT-300M 1024 / 16 heads at 448 / 14, pixel shuffle 0.5 (256
  tokens per tile, up to 12 tiles + thumbnail); Qwen2.5-0.5B 896 / 14 heads / 2 KV / vocab 151674.
* ``smolvlm``: HuggingFaceTB/SmolVLM-256M-Instruct — SigLIP-B 768 / 12 heads at 512 / 16, pixel shuffle 4 (64
  tokens per sub-image, longest edge 2048); SmolLM2-135M 576 / 9 heads / 3 KV / vocab 49280.

    python benchmarks/families.py                        # every family, markdown table on stdout
    python benchmarks/families.py --families gemma3 --new-tokens 8 --repeats 3 --json out.jsonl
    python benchmarks/families.py --threads 1                # CPU clock: stable ratios on a loaded CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory.py beside this script

from memory import peak_bytes  # noqa: E402

import steer  # noqa: E402
from steer import zoo  # noqa: E402
from steer.zoo.tiny import fill_zero_weights  # noqa: E402

FAMILIES = ("qwen3_vl", "llava_onevision", "gemma3", "internvl", "smolvlm")
METHODS: dict[str, dict[str, Any]] = {
    "scale_heads": {},
    "image_attention": {},
    "var": {"sink_dims": [0], "tau": 2.0},
    "vhr": {},
    "cca": {},
    "fastervlm": {},
    "vista": {},
}
IMAGE_SIZE = (640, 480)


def _tokenizer(family: str) -> Any:
    from steer.zoo.tiny import _BUILDERS, _make_tokenizer

    specials, named, _ = _BUILDERS[family]
    return _make_tokenizer(specials, named)


def build_real(family: str, layers: int = 2, vision_layers: int = 2, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """The family's smallest public checkpoint's config, decoder and tower cut to ``layers`` / ``vision_layers``,
    random weights in ``dtype``, and its processor (the zoo's classes at real image sizes)."""
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from steer.zoo.processors import (
        InternVLProcessorLite,
        LlavaOnevisionProcessorLite,
        Qwen3VLProcessorLite,
        SmolVLMProcessorLite,
    )

    tok = _tokenizer(family)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    tid = tok.convert_tokens_to_ids
    processor: Any
    if family == "qwen3_vl":
        text = dict(
            hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            **ids,
        )  # fmt: skip
        vision = dict(
            depth=vision_layers, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
            deepstack_visual_indexes=list(range(min(3, vision_layers))),
        )  # fmt: skip
        config: Any = tf.Qwen3VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True,
            image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        )  # fmt: skip
        cls: Any = tf.Qwen3VLForConditionalGeneration
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16, merge_size=2,
            temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        )  # fmt: skip
        processor = Qwen3VLProcessorLite(image_processor=image_processor, tokenizer=tok, video_processor=None)
    elif family == "llava_onevision":
        pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
        config = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers, num_attention_heads=16,
                patch_size=14, image_size=384,
            ),
            text_config=tf.Qwen2Config(
                hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, **ids,
            ),
            image_token_index=tid("<image>"), video_token_index=tid("<video>"), image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=True,
        )  # fmt: skip
        cls = tf.LlavaOnevisionForConditionalGeneration
        processor = LlavaOnevisionProcessorLite(
            image_processor=LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints),
            tokenizer=tok, video_processor=None, num_image_tokens=729, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )  # fmt: skip
    elif family == "gemma3":
        config = tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(
                hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, vocab_size=262208, query_pre_attn_scalar=256,
                sliding_window=1024, max_position_embeddings=131072,
                layer_types=(["sliding_attention"] * (layers - 1) + ["full_attention"]) if layers > 1 else ["full_attention"],
                **ids,
            ),
            vision_config=tf.SiglipVisionConfig(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers, num_attention_heads=16,
                patch_size=14, image_size=896,
            ),
            mm_tokens_per_image=256, boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
            image_token_index=tid("<image_soft_token>"),
        )  # fmt: skip
        cls = tf.Gemma3ForConditionalGeneration
        processor = tf.Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": 896, "width": 896}), tokenizer=tok, image_seq_length=256
        )
    elif family == "internvl":
        config = tf.InternVLConfig(
            vision_config=tf.InternVLVisionConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers, num_attention_heads=16,
                image_size=[448, 448], patch_size=[14, 14],
            ),
            text_config=tf.Qwen2Config(
                hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151674, max_position_embeddings=32768, rope_theta=1e6, **ids,
            ),
            image_token_id=tid("<IMG_CONTEXT>"), image_seq_length=256, downsample_ratio=0.5,
        )  # fmt: skip
        cls = tf.InternVLForConditionalGeneration
        processor = InternVLProcessorLite(
            image_processor=GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12),
            tokenizer=tok, video_processor=None, image_seq_length=256,
        )  # fmt: skip
    elif family == "smolvlm":
        config = tf.SmolVLMConfig(
            vision_config=tf.SmolVLMVisionConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=vision_layers, num_attention_heads=12,
                patch_size=16, image_size=512,
            ),
            text_config=tf.LlamaConfig(
                hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49280, max_position_embeddings=8192, rope_theta=100000, **ids,
            ),
            image_token_id=tid("<image>"), scale_factor=4,
        )  # fmt: skip
        cls = tf.SmolVLMForConditionalGeneration
        processor = SmolVLMProcessorLite(
            image_processor=SmolVLMImageProcessorPil(
                size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, do_image_splitting=True
            ),
            tokenizer=tok, video_processor=None, image_seq_len=64,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(config)
            fill_zero_weights(model)  # Gemma 3's projector and InternViT's [CLS] start at zero: images would not matter
        finally:
            torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return model, processor


def real_inputs(processor: Any, family: str, size: tuple[int, int] = IMAGE_SIZE) -> Any:
    """One chat prompt with one ``size`` image (width, height) through the family's processor."""
    prompt = zoo.chat_prompt(family, "Describe this image in detail.")
    return zoo.make_inputs(processor, family, [prompt], [[zoo.sample_image(0, size)]])


#: the clock: "wall" (time.perf_counter) or "cpu" (this thread's CPU time: with one torch thread on a shared CPU,
#: time the process spent descheduled does not count; the work done does). Set by --clock.
CLOCK = {"fn": time.perf_counter}


class _Stamps(StoppingCriteria):
    """Never stops; records the time of every generated token (called once per step, after its forward)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(CLOCK["fn"]())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(model: Any, inputs: Any, new_tokens: int) -> dict[str, Any]:
    """Greedy generation of exactly ``new_tokens`` tokens, timed inside ``generate``: prefill = start to the
    first token (vision tower, prefill forward, first argmax), decode = per token after it."""
    device = str(inputs["input_ids"].device)
    stamps = _Stamps(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = CLOCK["fn"]()
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([stamps]),
        )  # fmt: skip
    times = stamps.times
    return {
        "tokens": out.sequences,
        "logits": torch.stack(out.logits),
        "prefill_s": times[0] - start,
        "decode_s": (times[-1] - times[0]) / (len(times) - 1),
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-identical generated tokens and logits of every step."""
    return torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["logits"], b["logits"])


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def run_depth(
    family: str, depth: int, vision_layers: int, methods: list[str], new_tokens: int, repeats: int, device: str
) -> list[dict[str, Any]]:
    """The unsteered model and ``methods`` on one ``depth``-layer build, interleaved over ``repeats`` rounds.

    One untimed unsteered generation warms up; round 0 also measures the peak prefill memory (which warms
    the method up), records the unsteered reference, whether the method changes the output (``acts``) and
    whether the output after ``remove()`` is bit-identical to it (``exact``). A typed refusal (:class:`steer.SteerError`) is the method's row.
    """
    model, processor = build_real(family, depth, vision_layers)
    model = model.to(device)
    inputs = real_inputs(processor, family).to(device)
    variants = ["unsteered", *methods]
    rows = {v: {"family": family, "method": v, "layers": depth, "prompt": int(inputs["input_ids"].shape[1])} for v in variants}
    prefill: dict[str, list[float]] = {v: [] for v in variants}
    decode: dict[str, list[float]] = {v: [] for v in variants}
    reference: dict[str, Any] = {}
    generate(model, inputs, new_tokens)  # warm-up, untimed
    for round_ in range(repeats):
        for variant in variants:
            if "error" in rows[variant]:
                continue
            handle = None
            try:
                if variant != "unsteered":
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # CCA's stock-weights warning
                        handle = steer.apply(model, variant, **METHODS[variant])
                if round_ == 0:
                    peak = peak_bytes(lambda: model(**inputs, logits_to_keep=1), device)
                    rows[variant]["peak_mb"] = peak / 2**20
                out = generate(model, inputs, new_tokens)
            except steer.SteerError as error:  # a typed refusal is a result too
                rows[variant]["error"] = _describe(error)
                continue
            finally:
                if handle is not None:
                    handle.remove()
            prefill[variant].append(out["prefill_s"])
            decode[variant].append(out["decode_s"])
            if round_ == 0 and variant == "unsteered":
                reference = out
            elif round_ == 0:
                rows[variant]["acts"] = not same(out, reference)
                rows[variant]["exact"] = same(generate(model, inputs, new_tokens), reference)
    base = rows["unsteered"]
    for variant in variants:
        row = rows[variant]
        if "error" in row:
            continue
        row["prefill_ms"] = min(prefill[variant]) * 1000
        row["decode_ms"] = min(decode[variant]) * 1000
        if variant != "unsteered":
            row["ratio_prefill"] = row["prefill_ms"] / base["prefill_ms"]
            row["ratio_decode"] = row["decode_ms"] / base["decode_ms"]
            row["ratio_peak"] = row["peak_mb"] / base["peak_mb"] if base["peak_mb"] else float("nan")
    return list(rows.values())


def run_family(
    family: str, layers: int, vision_layers: int, new_tokens: int, repeats: int, methods: list[str], device: str = "cpu"
) -> list[dict[str, Any]]:
    """Every method of ``methods`` on ``family``: one build per decoder depth (VAR's 3 layers apart), each with
    its own unsteered row."""
    by_depth: dict[int, list[str]] = {}
    for method in methods:
        by_depth.setdefault(max(layers, 3) if method == "var" else layers, []).append(method)
    rows: list[dict[str, Any]] = []
    for depth, names in sorted(by_depth.items()):
        rows += run_depth(family, depth, vision_layers, names, new_tokens, repeats, device)
        gc.collect()  # the build is gone before the next one
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| family | method | layers | prompt tokens | prefill ms | × | decode ms/token | × | peak prefill MiB | × "
        "| acts | remove() exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['family']} | {r['method']} | {r['layers']} | {r['prompt']} "
        if "error" in r:
            out.append(f"{head}| refused: {r['error']} |||||||")
            continue
        rp, rd, rm = (f"{r[k]:.2f}" if k in r else "1" for k in ("ratio_prefill", "ratio_decode", "ratio_peak"))
        out.append(
            f"{head}| {r['prefill_ms']:.0f} | {rp} | {r['decode_ms']:.1f} | {rd} | {r['peak_mb']:.0f} | {rm} "
            f"| {r.get('acts', '-')} | {r.get('exact', '-')} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (VAR runs on 3)")
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8, help="generated tokens (at least 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (the best is kept; round 0 included)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock", choices=("auto", "wall", "cpu"), default="auto",
        help="wall time, or the thread's CPU time (auto: cpu on a CPU with one thread, else wall)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here, one JSON line each")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode time is measured between tokens)")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    CLOCK["fn"] = time.thread_time if clock == "cpu" else time.perf_counter
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    )
    print(
        f"real widths, {args.layers} decoder + {args.vision_layers} vision layers (VAR: {max(args.layers, 3)}), bf16, "
        f"sdpa, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, batch 1, {args.new_tokens} new tokens, best of "
        f"{args.repeats} (interleaved), {clock} clock; device {args.device} ({where}); torch {torch.__version__}",
        flush=True,
    )
    if args.json:
        args.json.write_text("")
    rows: list[dict[str, Any]] = []
    for family in args.families:
        got = run_family(family, args.layers, args.vision_layers, args.new_tokens, args.repeats, args.methods, args.device)
        for row in got:
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
            print(json.dumps(shown), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        rows += got
    print(table(rows))
    memory = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "live-tensor bytes"
    print(f"(peak prefill memory: {memory} above what the model holds; × = ratio to the unsteered row above it)")
    return rows


if __name__ == "__main__":
    bad = [r for r in main() if r.get("exact") is False]
    sys.exit(f"remove() not exact: {[(r['family'], r['method']) for r in bad]}" if bad else 0)
