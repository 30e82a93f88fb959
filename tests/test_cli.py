"""The `steer` command: the README's demo runs offline and reports what changed."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from steer.cli import app

runner = CliRunner()


def test_demo_runs_offline_and_reports_changes() -> None:
    result = runner.invoke(app, ["demo", "--max-new-tokens", "4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "GroupReweight" in result.output
    assert re.search(r"after remove\(\): identical to unsteered\s+│\s+True", result.output), result.output
    assert "16 image tokens" in result.output


def test_demo_other_family_and_method_parameters() -> None:
    result = runner.invoke(
        app, ["demo", "--family", "qwen2_vl", "--method", "scale_heads", "-p", "alpha=3.0", "--max-new-tokens", "3"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert '"alpha": 3.0' in result.output and "HeadScale" in result.output


def test_demo_bad_parameter_is_a_clear_error() -> None:
    result = runner.invoke(app, ["demo", "--method", "scale_heads", "-p", "alpha=-2"])
    assert result.exit_code == 2
    assert "error: scale_heads: alpha=-2.0 is out of range; it must be in [0, 100]" in result.output
    result = runner.invoke(app, ["demo", "--method", "var"])  # tiny model: no known sink channels
    assert result.exit_code == 2 and "steer calibrate sinks" in result.output


def test_methods_json() -> None:
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    names = {m["name"] for m in json.loads(result.output)}
    assert {"scale_heads", "image_attention"} <= names


def test_the_methods_manifest_is_the_live_registry() -> None:
    """`steer methods` reads steer/methods.json (no torch); it must say what the registry says. If this fails,
    regenerate it: python -m steer.manifest"""
    from steer import manifest

    assert json.loads(manifest.PATH.read_text()) == manifest.live()


def test_methods_one_method_shows_ranges_and_families() -> None:
    result = runner.invoke(app, ["methods", "var"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "families: llava-1.5, llava-next, qwen2-vl, qwen2.5-vl" in result.output
    assert re.search(r"rho\s+│\s+0\.5\s+│\s+\[0\.0, 1\.0\]", result.output), result.output
    assert re.search(r"impl\s+│\s+'auto'\s+│\s+one of 'auto', 'fused', 'reference'", result.output), result.output
    result = runner.invoke(app, ["methods", "varr"])
    assert result.exit_code == 2 and "error: unknown method 'varr'" in result.output


def test_version_and_bad_family_are_one_line() -> None:
    from steer import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"steer {__version__}"
    result = runner.invoke(app, ["demo", "--family", "gpt2"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: unknown family 'gpt2'") and "Traceback" not in result.output


def test_help_and_methods_do_not_import_torch() -> None:
    """The command starts fast: `steer --help` and `steer methods` import no torch, transformers or diffusers
    (figures: benchmarks/startup.py)."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom typer.testing import CliRunner\nfrom steer.cli import app\n"
        "for args in (['--help'], ['methods'], ['methods', 'vista'], ['eval', '--help'], ['calibrate', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_diffusers_demo_user_errors_are_one_line(tmp_path: object) -> None:
    import subprocess
    import sys

    def demo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "steer.diffusers.demo", "--steps", "2", "--out", str(tmp_path), *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    for args, message in (
        (["--tokens", "cat", "horse"], "error: astar: 'horse' is not in the prompt"),
        (["--model", "./no/such/pipeline"], "error: --model ./no/such/pipeline: no such folder"),
    ):
        done = demo(*args)
        assert done.returncode == 2, done.stderr[-1500:]
        assert "Traceback" not in done.stderr and message in done.stderr
    done = demo("-p", "alpha")
    assert done.returncode == 2 and "--param expects NAME=JSON" in done.stderr and "Traceback" not in done.stderr


def test_load_tiny_sd_takes_the_kind_first() -> None:
    from steer import zoo

    assert type(zoo.load_tiny_sd("sdxl")).__name__ == "StableDiffusionXLPipeline"
    assert type(zoo.load_tiny_sd()).__name__ == "StableDiffusionPipeline"
