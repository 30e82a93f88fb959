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
