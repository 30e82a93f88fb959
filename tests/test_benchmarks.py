"""The benchmark scripts start: their folder is sys.path[0] when run, so a script named like a package that
transformers probes (e.g. `kernels`) would break every other script's imports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "memory.py"))
def test_benchmark_script_starts(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def _load_group_kernels() -> object:
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling memory.py
    try:
        spec = importlib.util.spec_from_file_location("bench_group_kernels", BENCHMARKS / "group_kernels.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_group_kernels_survives_a_failing_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check runs this script once: a case that fails (out of memory, say) is recorded and the others
    are still measured; every row reaches the JSON file as soon as it is measured."""
    import json

    bench = _load_group_kernels()
    real_case = bench.make_case  # type: ignore[attr-defined]

    def make_case(prompt: int, *args: object) -> object:
        if prompt == 96:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_case(prompt, *args)

    monkeypatch.setattr(bench, "make_case", make_case)
    out = tmp_path / "rows.jsonl"
    argv = "--device cpu --lengths 64,96 --decode-cache 64 --heads 2 --head-dim 16".split()
    rows = bench.main([*argv, "--repeats", "1", "--json", str(out)])  # type: ignore[attr-defined]
    assert [r["case"] for r in rows] == ["prefill 64", "prefill 96", "decode 64"]
    assert "out of memory" in rows[1]["error"] and "error" not in rows[0] and "error" not in rows[2]
    for row in (rows[0], rows[2]):
        assert row["time_b_over_a"] > 0 and row["max_abs_diff_fused_ref"] < 1e-5
    assert [json.loads(line)["case"] for line in out.read_text().splitlines()] == [r["case"] for r in rows]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
    reason="the sweep runs the Triton kernel: CUDA, or triton's interpreter (TRITON_INTERPRET=1, set on CPU)",
)
def test_group_kernels_sweep_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--sweep`` (run once by the GPU check): one row per launch variant and case, the default first; a
    variant that fails is a row with its error, the others still timed and equal to the default's output."""
    import json

    bench = _load_group_kernels()
    triton_group = bench.triton_group  # type: ignore[attr-defined]
    real_kernel = triton_group.triton_group_attention

    def kernel(*args: object, **kwargs: object) -> object:
        if kwargs.get("block_m") == 128:
            raise RuntimeError("out of resource: shared memory (simulated)")
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(triton_group, "triton_group_attention", kernel)
    out = tmp_path / "rows.jsonl"
    argv = "--device cpu --lengths 48 --decode-cache 48 --heads 2 --head-dim 16 --repeats 1 --sweep".split()
    rows = [r for r in bench.main([*argv, "--json", str(out)]) if r.get("sweep")]  # type: ignore[attr-defined]
    prefill = [r for r in rows if r["case"] == "prefill 48"]
    decode = [r for r in rows if r["case"] == "decode 48"]
    assert len(prefill) == 2 + len(bench.PREFILL_TILES) and len(decode) == 2 + len(bench.DECODE_LAUNCHES)
    assert "block_m" not in prefill[0] and prefill[0]["over_default"] == 1.0
    # the dispatcher's choice first (prefill: base given, decode: one pass), the other one last
    assert [
        prefill[0]["one_pass"],
        prefill[-1]["one_pass"],
        decode[0]["one_pass"],
        decode[-1]["one_pass"],
    ] == [False, True, True, False]
    assert (
        prefill[0]["layer_ms"] > prefill[0]["kernel_ms"] and decode[0]["layer_ms"] == decode[0]["kernel_ms"]
    )
    failed = [r for r in prefill if "error" in r]
    assert len(failed) == 1 and failed[0]["block_m"] == 128
    for row in prefill + decode:
        if "error" not in row:
            assert row["kernel_ms"] > 0 and row["max_abs_diff_default"] < 1e-5
    assert sum(1 for line in out.read_text().splitlines() if json.loads(line).get("sweep")) == len(rows)


def test_baselines_rows_on_a_tiny_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """benchmarks/baselines.py measures every row against its reference (greedy / beam 5) on a tiny model."""
    import json

    import torch

    from steer import zoo

    sys.path.insert(0, str(BENCHMARKS))  # the script imports its siblings attention_methods.py and memory.py
    try:
        spec = importlib.util.spec_from_file_location("bench_baselines", BENCHMARKS / "baselines.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCHMARKS))
    model, processor = zoo.load_tiny("llava")
    inputs = dict(zoo.make_inputs(processor, "llava", [zoo.chat_prompt("llava", "Describe.")], [[zoo.sample_image(1)]]))
    monkeypatch.setattr(bench, "build", lambda device, dtype: (model, inputs))
    threads = torch.get_num_threads()
    out = tmp_path / "rows.json"
    try:
        rows = bench.main(  # type: ignore[attr-defined]
            ["--new-tokens", "3", "--repeats", "1", "--variants", "vcd (batched branch),opera (tree look-ahead)", "--json", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    assert list(rows) == ["beam 5 (unsteered)", "greedy (unsteered)", "vcd (batched branch)", "opera (tree look-ahead)"]
    for row in rows.values():
        assert row["decode_ms"] > 0 and row["prefill_ms"] > 0 and row["peak_mb"] > 0
    assert json.loads(out.read_text())["results"].keys() == rows.keys()
