"""Compile steer's Triton group-attention kernels for a GPU target without a GPU, and report registers/spills.

    /work/venv/bin/python benchmarks/compile_check.py [--arch 90] [--configs all|quick]

The CPU tests run the kernels in Triton's interpreter, which never builds GPU code; this script runs the real
compiler (Triton -> PTX -> ptxas cubin, the ptxas bundled with the triton wheel) for the launch shapes the
dispatcher uses (tiles from `steer.kernels.triton_group.tiles`), with the specialisations the JIT makes at
run time (unit strides as constants; pointers, strides, the KV length, the split size and the row count
divisible by 16, as for a 4k cache). A compile error here is
a GPU bug the interpreter cannot show; ``STACK > 0`` means register spills. Exit status 1 on any error.
Needs triton with its NVIDIA backend; ``TRITON_INTERPRET`` must be unset (the script unsets it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any  # noqa: E402

import torch  # noqa: E402

from steer.kernels.triton_group import tiles  # noqa: E402

# triton and the kernels load in main() (so that --help works without the `kernels` extra)
triton: Any = None
GPUTarget: Any = None
ASTSource: Any = None
kernels: Any = None


def _load_triton() -> None:
    global triton, GPUTarget, ASTSource, kernels
    import triton as _triton
    from triton.backends.compiler import GPUTarget as _target
    from triton.compiler import ASTSource as _source

    from steer.kernels import _triton_group_kernels as _kernels

    triton, GPUTarget, ASTSource, kernels = _triton, _target, _source, _kernels

UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_xd", "stride_mn", "stride_bn",
                "stride_ln", "stride_is", "stride_hh")  # fmt: skip
INTS = ("Hkv", "Lq", "Lk", "n_slots", "chunk", "R", "Hq", "S")
FLOATS = ("qk_scale", "p_coef", "one_minus_rho", "min_vis")
DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def pointer_types(dt: str) -> dict[str, str]:
    return {
        "Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "OUT": f"*{dt}", "BASE": f"*{dt}",
        "LAB": "*i32", "MASK": "*u8", "BIAS": "*fp32", "IDX": "*i32", "EDIT": "*i8", "HS": "*fp32",
        "NVIS": "*fp32", "COEF": "*fp32", "SEL": "*i8", "PACC": "*fp32", "PL": "*fp32", "PM": "*fp32",
    }  # fmt: skip


def compile_kernel(fn, dt: str, constexprs: dict, num_warps: int, arch: int, num_stages: int = 3) -> dict:
    const = dict(constexprs)
    for name in UNIT_STRIDES:
        if name in fn.arg_names:
            const[name] = 1
    ptrs = pointer_types(dt)
    signature = {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
        elif name.startswith("stride") or name in INTS:
            signature[name] = "i32"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            raise KeyError(f"unknown kernel argument {name}")
    aligned = [i for i, n in enumerate(fn.arg_names)
               if signature[n] != "constexpr" and (signature[n].startswith("*") or n.startswith("stride")
                                                   or n in ("Lk", "chunk", "R"))]  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn, signature, constexprs=const, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"steer_{fn.__name__}_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run(
        [str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
    ).stdout
    cubin.unlink()
    line = next((x.strip() for x in usage.splitlines() if "REG:" in x), "")
    fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
    return {
        "regs": int(fields.get("REG", -1)),
        "stack": int(fields.get("STACK", -1)),
        "shared": compiled.metadata.shared,
    }


def configs(which: str) -> list[tuple[str, object, torch.dtype, dict]]:
    """(name, kernel, dtype, constexprs without tiles) — the launches the dispatcher makes for VAR and lists."""
    var = dict(RULE=2, NACC=2, G_SV=1, G_ST=2, G_NV=3, D=128, BLOCK_D=128, REP=1, CAUSAL=False, HAS_MASK=True,
               HAS_BIAS=False, HAS_INDEX=True, HAS_EDIT=False, HAS_HS=False, RENORM=False, WRITE_SEL=True,
               SPLIT=False, BASE_ACC=True, UPCAST=False)  # fmt: skip
    # decode: one pass with the base output (no BASE, rows flagged in place), KV split, then the combine
    one = dict(var, SPLIT=True, BASE_ACC=False, HAS_INDEX=False, HAS_EDIT=True)
    combine = dict(D=128, BLOCK_R=16, BLOCK_D=128, RULE=2, NACC=2, HAS_INDEX=False, HAS_EDIT=True, HAS_HS=False,
                   RENORM=False, WRITE_SEL=True, BASE_ACC=False)  # fmt: skip
    out = [
        ("var prefill, gathered rows", kernels.group_attn_fwd, torch.bfloat16, dict(var, _rows=1024)),
        ("var decode, one pass, split KV", kernels.group_attn_fwd, torch.bfloat16, dict(one, _rows=1)),
        ("var decode, one pass, GQA 4", kernels.group_attn_fwd, torch.float16, dict(one, REP=4, _rows=4)),
        ("combine, var one pass", kernels.group_attn_combine, torch.bfloat16, combine),
    ]
    if which == "all":
        out += [
            ("var decode, base given, split", kernels.group_attn_fwd, torch.bfloat16, dict(var, SPLIT=True, _rows=1)),
            ("combine, var base given", kernels.group_attn_combine, torch.bfloat16,
             dict(combine, HAS_INDEX=True, HAS_EDIT=False, BASE_ACC=True)),
        ]  # fmt: skip
        const = dict(var, RULE=1, NACC=3, BASE_ACC=False, HAS_INDEX=False, HAS_EDIT=True, HAS_HS=True,
                     HAS_BIAS=True, RENORM=True, CAUSAL=True, WRITE_SEL=False)  # fmt: skip
        out += [
            ("constant x3, all features", kernels.group_attn_fwd, torch.bfloat16, dict(const, _rows=4096)),
            ("constant x3, all features", kernels.group_attn_fwd, torch.float32, dict(const, _rows=4096)),
            ("var prefill, D=256", kernels.group_attn_fwd, torch.bfloat16, dict(var, D=256, BLOCK_D=256, _rows=4096)),
            ("plain attention (masks only)", kernels.group_attn_fwd, torch.bfloat16,
             dict(var, RULE=0, NACC=0, BASE_ACC=False, HAS_INDEX=False, CAUSAL=True, HAS_MASK=False, _rows=4096)),
        ]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--configs", default="all", choices=("all", "quick"))
    ap.add_argument("--stages", type=int, default=None, help="override num_stages (default: as launched)")
    args = ap.parse_args(argv)
    _load_triton()
    print(f"# triton {triton.__version__}, target sm_{args.arch}")
    failed = 0
    for name, fn, dtype, const in configs(args.configs):
        const = dict(const)
        rows = const.pop("_rows", 0)
        if fn is kernels.group_attn_fwd:
            live = const["NACC"] + (0 if const["BASE_ACC"] else 1)
            block_m, block_n, warps = tiles(dtype, rows * const["REP"], const["BLOCK_D"], live)
            const.update(BLOCK_M=block_m, BLOCK_N=block_n, IEEE=dtype == torch.float32)
            tile = f"{block_m}x{block_n} w{warps}"
        else:
            warps, tile = 4, "16 rows w4"
        start = time.perf_counter()
        try:
            r = compile_kernel(fn, DT[dtype], const, warps, args.arch, args.stages or 3)
        except Exception as exc:  # a GPU compile error the interpreter cannot show
            failed += 1
            print(f"FAIL {name:<30} {DT[dtype]:<5} {tile:<12} {type(exc).__name__}: {exc}")
            continue
        spill = "" if r["stack"] == 0 else "  <- spills"
        print(f"ok   {name:<30} {DT[dtype]:<5} {tile:<12} regs {r['regs']:>3}  stack {r['stack']:>4} B  "
              f"shared {r['shared']:>6} B  ({time.perf_counter() - start:.1f} s){spill}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
