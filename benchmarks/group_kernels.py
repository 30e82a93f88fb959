"""Cost of steer's fused VAR attention against plain SDPA and the eager reference. Not a test.

    /work/venv/bin/python benchmarks/group_kernels.py [--device cpu|cuda] [--lengths 1024,4096,16384]
        [--decode-cache 4096] [--heads 32] [--kv-heads 32] [--head-dim 128] [--dtype bf16|fp16|fp32]
        [--repeats 5] [--json FILE]

One attention layer of a LLaVA-like prompt, batch 1: 35 text tokens (the first is a text sink), an image
(576 tokens up to a 1k prompt, 2880 — LLaVA-NeXT's 5 × 576 — above), 4 visual sinks in it, text after it;
VAR's key groups (Sv, St, Nv, other) and its eligible rows (text after the image; in decode the new row).
Per case, medians over ``--repeats`` (after 2 warm-up calls):

* (a) ``sdpa``: ``F.scaled_dot_product_attention`` (causal in prefill), what the unsteered layer runs;
* (b) ``fused``: what a VAR layer runs in steer — (a) for the base output, then
  ``reweighted_attention(..., rows, base_out, rule)`` with ``impl="auto"``: the Triton kernel on CUDA
  when triton is installed, the SDPA + LSE-merge path otherwise (the column ``path`` says which); in
  decode the Triton kernel computes the base output itself (one pass over K and V, no (a));
* (c) ``reference``: ``group_reweight_reference`` (materialised probabilities), skipped when its
  estimated memory (6 fp32 [H, Lq, Lk] tensors) exceeds ``--reference-max-gb``;
* on CUDA also ``lse``: (a) + the LSE-merge path forced (``impl="fused"``), for comparison.

Printed: time (ms) and peak memory above the inputs (MiB; CUDA: ``max_memory_allocated``; CPU: bytes of live
tensors allocated by aten ops, tracked at dispatch level) and the ratios b/a and c/b. ``--json`` writes the
rows as JSON lines. Also checks that (b) and (c) agree (max abs difference printed).

``--sweep`` (CUDA, or Triton's interpreter): afterwards, the Triton kernel alone (the part of (b) after the
base output) at other tile sizes, warp counts and, in decode, KV split counts, against the default choice of
``steer.kernels.triton_group.tiles`` — so that one GPU run also says which tiles to pick.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import peak_bytes  # noqa: E402  (benchmarks/memory.py)

from steer.kernels import group_reweight_reference, reweighted_attention, triton_group  # noqa: E402
from steer.kernels.dispatch import ONE_PASS_MAX_ROWS  # noqa: E402
from steer.kernels.lse import MATH_MAX_ROWS, attention_with_lse  # noqa: E402
from steer.methods.vlm.var import (  # noqa: E402
    LABEL_NV,
    LABEL_ST,
    LABEL_SV,
    var_rule,  # noqa: E402
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX = 35
VISUAL_SINKS = (1, 100, 300, 500)  # ranks inside the image


# --------------------------------------------------------------------------------------------------
# inputs


def layout(length: int) -> tuple[int, int]:
    """(image start, image length) of a prompt of ``length`` tokens."""
    n_img = 576 if length <= 1024 else 2880
    n_img = max(0, min(n_img, length - PREFIX - 16))
    return PREFIX, n_img


def make_case(
    prompt: int, q_len: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> dict[str, Any]:
    """Query rows = the last ``q_len`` positions of a prompt of ``prompt`` keys (q_len = prompt: prefill)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, q_len, head_dim, generator=g).to(device, dtype)
    k = torch.randn(1, kv_heads, prompt, head_dim, generator=g)
    v = torch.randn(1, kv_heads, prompt, head_dim, generator=g).to(device, dtype)
    start, n_img = layout(prompt)
    labels = torch.zeros(1, prompt, dtype=torch.long)
    labels[0, 0] = LABEL_ST
    labels[0, start : start + n_img] = LABEL_NV
    for rank in VISUAL_SINKS:
        if rank <= n_img:
            labels[0, start + rank - 1] = LABEL_SV
    k[0, :, labels[0] == LABEL_SV] += 3.0 * q.float().mean((0, 1, 2)).cpu()  # make the sinks attract mass
    k[0, :, 0] += 3.0 * q.float().mean((0, 1, 2)).cpu()
    k = k.to(device, dtype)
    offset = prompt - q_len
    positions = torch.arange(offset, prompt)
    rows = (positions >= start + n_img)[None]
    mask = torch.ones(q_len, prompt, dtype=torch.bool).tril(offset)[None, None]
    rule = var_rule(0.6, 0.5, 0.2, float(n_img), groups=(LABEL_SV, LABEL_ST, LABEL_NV))
    return {
        "q": q,
        "k": k,
        "v": v,
        "labels": labels.to(device),
        "rows": rows.to(device),
        "mask": mask.to(device),
        "rule": rule,
        "scale": head_dim**-0.5,
        "causal": q_len > 1 and q_len == prompt,  # SDPA's is_causal; steer then passes no mask tensor
        "image": (start, n_img),
    }


# --------------------------------------------------------------------------------------------------
# the three (four) variants


def sdpa(c: dict[str, Any]) -> torch.Tensor:
    gqa = c["q"].shape[1] != c["k"].shape[1]
    return F.scaled_dot_product_attention(
        c["q"], c["k"], c["v"], is_causal=c["causal"], scale=c["scale"], enable_gqa=gqa
    )


def steered(c: dict[str, Any], impl: str = "auto") -> torch.Tensor:
    """What steer's attention function does for an edited layer: on CPU with many rows, one fused pass that
    returns the output and its log-sum-exp; otherwise the plain backend output."""
    base_lse = None
    causal = c["causal"]
    mask = None if causal else c["mask"]
    base: torch.Tensor | Callable[[], torch.Tensor]
    if c["q"].device.type == "cpu" and c["q"].shape[2] > MATH_MAX_ROWS:
        base, base_lse = attention_with_lse(c["q"], c["k"], c["v"], mask, c["scale"], causal=causal)
    else:
        base = lambda: sdpa(c)  # noqa: E731  (the Triton path skips it in decode: one pass)
    rule = c["rule"]
    return reweighted_attention(
        c["q"], c["k"], c["v"], mask, c["scale"], c["labels"], rule.coefficients,
        rows=c["rows"], base_out=base, impl=impl, rule=rule, base_lse=base_lse, causal=causal,
    )  # fmt: skip


def reference(c: dict[str, Any]) -> torch.Tensor:
    base = sdpa(c)
    out = group_reweight_reference(
        c["q"], c["k"], c["v"], c["mask"], c["scale"], c["labels"], c["rule"].coefficients,
        rows=c["rows"], base_out=base,
    )  # fmt: skip
    assert isinstance(out, torch.Tensor)
    return out


def path_used(c: dict[str, Any]) -> str:
    q = c["q"]
    if (
        q.device.type == "cuda"
        and triton_group.supports(q, c["k"], c["v"], c["rule"], mask=c["mask"]) is None
    ):
        return "triton"
    return "lse"


# --------------------------------------------------------------------------------------------------
# measurements


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(
    c: dict[str, Any], phase: str, prompt: int, q_len: int, repeats: int, ref_max: float
) -> dict[str, Any]:
    device = c["q"].device.type
    heads = c["q"].shape[1]
    row: dict[str, Any] = {
        "case": f"{phase} {prompt}",
        "phase": phase,
        "prompt": prompt,
        "q_len": q_len,
        "edited_rows": int(c["rows"].sum()),
        "image": c["image"],
        "path": path_used(c),
    }
    row["sdpa_ms"] = time_ms(lambda: sdpa(c), device, repeats)
    row["fused_ms"] = time_ms(lambda: steered(c), device, repeats)
    row["sdpa_mib"] = peak_bytes(lambda: sdpa(c), device) / 2**20
    row["fused_mib"] = peak_bytes(lambda: steered(c), device) / 2**20
    if device == "cuda":
        row["lse_ms"] = time_ms(lambda: steered(c, "fused"), device, repeats)
        row["lse_mib"] = peak_bytes(lambda: steered(c, "fused"), device) / 2**20
    est_gb = 6 * heads * q_len * prompt * 4 / 1e9
    if est_gb <= ref_max:
        row["ref_ms"] = time_ms(lambda: reference(c), device, max(1, min(repeats, 3)), warmup=1)
        row["ref_mib"] = peak_bytes(lambda: reference(c), device) / 2**20
        with torch.no_grad():
            row["max_abs_diff_fused_ref"] = (steered(c).float() - reference(c).float()).abs().max().item()
            if device == "cuda":
                lse = steered(c, "fused").float()
                row["max_abs_diff_lse_ref"] = (lse - reference(c).float()).abs().max().item()
    else:
        row["ref_skipped"] = f"estimated {est_gb:.0f} GB > {ref_max:g} GB"
    row["time_b_over_a"] = row["fused_ms"] / row["sdpa_ms"]
    row["mem_b_over_a"] = row["fused_mib"] / max(row["sdpa_mib"], 1e-9)
    if "ref_ms" in row:
        row["time_c_over_b"] = row["ref_ms"] / row["fused_ms"]
        row["mem_c_over_b"] = row["ref_mib"] / max(row["fused_mib"], 1e-9)
    return row


HEADER = (
    f"{'case':<16}{'path':>7}{'rows':>7}{'sdpa ms':>10}{'fused ms':>10}{'ref ms':>10}"
    f"{'b/a':>7}{'c/b':>7}{'sdpa MiB':>10}{'fused MiB':>11}{'ref MiB':>10}{'b/a':>7}{'c/b':>7}{'|b-c|':>10}"
)


def print_row(row: dict[str, Any]) -> None:
    def f(key: str, width: int, fmt: str = ".1f") -> str:
        return f"{row[key]:>{width}{fmt}}" if key in row else f"{'-':>{width}}"

    print(
        f"{row['case']:<16}{row['path']:>7}{row['edited_rows']:>7}{f('sdpa_ms', 10)}{f('fused_ms', 10)}"
        f"{f('ref_ms', 10)}{f('time_b_over_a', 7, '.2f')}{f('time_c_over_b', 7, '.2f')}{f('sdpa_mib', 10)}"
        f"{f('fused_mib', 11)}{f('ref_mib', 10)}{f('mem_b_over_a', 7, '.2f')}{f('mem_c_over_b', 7, '.2f')}"
        f"{f('max_abs_diff_fused_ref', 10, '.1e')}",
        flush=True,
    )
    if "lse_ms" in row:
        diff = f"   |lse-c| {row['max_abs_diff_lse_ref']:.1e}" if "max_abs_diff_lse_ref" in row else ""
        print(f"{'':<16}{'lse':>7}{'':>17}{row['lse_ms']:>10.1f}{'':>44}{row['lse_mib']:>11.1f}{diff}")
    if "ref_skipped" in row:
        print(f"{'':<16}reference skipped: {row['ref_skipped']}")


# --------------------------------------------------------------------------------------------------
# tile sweep: the Triton kernel alone, other launch parameters

PREFILL_TILES = [(64, 64, 8), (64, 64, 4), (32, 64, 4), (32, 64, 8), (64, 32, 4), (32, 32, 4), (128, 32, 8),
                 (64, 128, 8)]  # fmt: skip
# decode: (num_splits, BLOCK_N, num_warps); None = the default choice
DECODE_LAUNCHES = [(None, 64, None), (4, 64, None), (8, 64, None), (16, 64, None), (32, 64, None),
                   (64, 64, None), (None, 128, None), (16, 128, 8)]  # fmt: skip


def sweep(c: dict[str, Any], phase: str, prompt: int, repeats: int) -> list[dict[str, Any]]:
    """Each launch variant of the Triton kernel, the first row the default (every knob None, and the base
    output as the dispatcher does it: given in prefill, computed in the same pass in decode). ``kernel_ms`` is
    the kernel alone, ``layer_ms`` adds the SDPA pass for the base output where the variant takes it, and
    ``over_default`` / ``over_sdpa`` compare ``layer_ms``. One variant flips the base: prefill in one pass,
    decode with the base given (two passes), to check the dispatcher's choice."""
    device = c["q"].device.type
    one_pass_default = c["q"].shape[2] <= ONE_PASS_MAX_ROWS
    base = sdpa(c)
    sdpa_ms = time_ms(lambda: sdpa(c), device, repeats)
    causal = c["causal"]

    def kernel(one_pass: bool = one_pass_default, **launch: Any) -> torch.Tensor:
        out = triton_group.triton_group_attention(
            c["q"], c["k"], c["v"], c["labels"], scale=c["scale"], rule=c["rule"],
            mask=None if causal else c["mask"], causal=causal, rows=c["rows"],
            base_out=None if one_pass else base, **launch,
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        return out

    variants: list[dict[str, Any]] = [{}]
    if phase == "prefill":
        variants += [dict(block_m=m, block_n=n, num_warps=w) for m, n, w in PREFILL_TILES]
    else:
        variants += [dict(num_splits=s, block_n=n, num_warps=w) for s, n, w in DECODE_LAUNCHES]
    variants.append({"one_pass": not one_pass_default})
    with torch.no_grad():
        want = kernel().float()
    rows: list[dict[str, Any]] = []
    for launch in variants:
        row: dict[str, Any] = {"case": f"{phase} {prompt}", "sweep": True, **launch}
        row["one_pass"] = launch.get("one_pass", one_pass_default)
        try:
            with torch.no_grad():
                row["max_abs_diff_default"] = (kernel(**launch).float() - want).abs().max().item()
            row["kernel_ms"] = time_ms(lambda launch=launch: kernel(**launch), device, repeats)
            row["layer_ms"] = row["kernel_ms"] + (0.0 if row["one_pass"] else sdpa_ms)
            row["over_sdpa"] = row["layer_ms"] / sdpa_ms
        except Exception as exc:  # a variant the compiler or the card refuses (shared memory, say)
            row["error"] = repr(exc)[:300]
        rows.append(row)
    default = rows[0].get("layer_ms")
    for row in rows:
        row["sdpa_ms"] = sdpa_ms
        if default and "layer_ms" in row:
            row["over_default"] = row["layer_ms"] / default
    return rows


def print_sweep(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        knobs = " ".join(
            f"{k}={row[k]}"
            for k in ("block_m", "block_n", "num_warps", "num_splits")
            if row.get(k) is not None
        )
        knobs = f"{'one pass' if row.get('one_pass') else 'base given'} {knobs or 'default tiles'}"
        if "error" in row:
            print(f"  sweep {row['case']:<14} {knobs:<52} FAILED {row['error']}", flush=True)
        else:
            print(
                f"  sweep {row['case']:<14} {knobs:<52} kernel {row['kernel_ms']:8.3f} ms  layer/SDPA "
                f"{row['over_sdpa']:5.2f}  x{row.get('over_default', float('nan')):.2f} of default  "
                f"|diff| {row['max_abs_diff_default']:.1e}",
                flush=True,
            )


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    ap.add_argument("--lengths", default="1024,4096,16384", help="prefill prompt lengths, comma-separated")
    ap.add_argument("--decode-cache", type=int, default=4096, help="KV length of the decode case (0 = none)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (LLaVA-7B is MHA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reference-max-gb", type=float, default=None, help="default: 48 on CUDA, 6 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", type=Path, default=None, help="append the rows as JSON lines")
    ap.add_argument(
        "--sweep", action="store_true", help="then time the Triton kernel at other launch parameters"
    )
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda, but torch {torch.__version__} has no usable CUDA device")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    kv_heads = args.kv_heads or args.heads
    ref_max = (
        args.reference_max_gb if args.reference_max_gb is not None else (48.0 if device == "cuda" else 6.0)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("prefill", int(x), int(x)) for x in args.lengths.split(",") if x.strip()]
    if args.decode_cache:
        cases.append(("decode", args.decode_cache, 1))

    env = f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device == "cuda":
        env += f", {torch.cuda.get_device_name()}"
    try:
        import triton

        env += f", triton {triton.__version__}"
    except ImportError:
        env += ", no triton"
    print(f"# {env}; B=1, H={args.heads}, Hkv={kv_heads}, D={args.head_dim}, {str(dtype)[6:]}, {device}")
    print(HEADER)
    results = []
    for phase, prompt, q_len in cases:
        shape = dict(
            device=device, dtype=str(dtype)[6:], heads=args.heads, kv_heads=kv_heads, head_dim=args.head_dim
        )
        try:
            c = make_case(prompt, q_len, args.heads, kv_heads, args.head_dim, dtype, device)
            row = measure(c, phase, prompt, q_len, args.repeats, ref_max)
            del c
        except Exception as exc:  # one failing case (out of memory, say) must not lose the others
            row = {"case": f"{phase} {prompt}", "phase": phase, "prompt": prompt, "error": repr(exc)[:500]}
            print(f"{row['case']:<16}FAILED: {row['error']}", flush=True)
        else:
            print_row(row)
        row.update(shape)
        results.append(row)
        append_json(args.json, [row])
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.sweep:
        results += run_sweep(cases, args, kv_heads, dtype, device)
    return results


def append_json(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """Append `rows` to `path` as JSON lines (nothing without a path): called per case, so that a run stopped
    at its time limit keeps what it measured."""
    if path is not None:
        with path.open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)


def run_sweep(
    cases: list[tuple[str, int, int]],
    args: argparse.Namespace,
    kv_heads: int,
    dtype: torch.dtype,
    device: str,
) -> list[dict[str, Any]]:
    """The sweep of every case the kernel runs on here (4k prefill first: the target case)."""
    if device != "cuda" and not triton_group.interpreting():
        print("# sweep: needs CUDA (or TRITON_INTERPRET=1); skipped")
        return []
    print(
        "# sweep: Triton launch variants; layer = kernel (+ SDPA where the base is given), against SDPA and the default"
    )
    order = sorted(cases, key=lambda case: (case[1] != 4096, case[0] != "prefill", case[1]))
    rows: list[dict[str, Any]] = []
    for phase, prompt, q_len in order:
        try:
            c = make_case(prompt, q_len, args.heads, kv_heads, args.head_dim, dtype, device)
            found = sweep(c, phase, prompt, args.repeats)
            del c
        except Exception as exc:
            found = [{"case": f"{phase} {prompt}", "sweep": True, "error": repr(exc)[:300]}]
        print_sweep(found)
        append_json(args.json, found)
        rows += found
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(1 if any("error" in row and not row.get("sweep") for row in main()) else 0)
