"""The README works as written: every Python block runs (in order, in one namespace, as a reader would paste
them), offline, on the demo model, a zoo model or the tiny SD pipeline it loads; CI installs exactly what the
README says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_every_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)  # blocks may write files (maps.png)
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # pragma: no cover - the failure message names the block
            raise AssertionError(f"README python block {i} fails: {type(exc).__name__}: {exc}\n{block}") from exc


def test_ci_installs_exactly_what_the_readme_says() -> None:
    install = re.search(r"## Install\n\n```bash\n(.*?)```", README, flags=re.S)
    assert install is not None
    readme_lines = [line.split("#")[0].strip() for line in install.group(1).splitlines() if line.strip()]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [line.split("#")[0].strip() for line in ci.splitlines() if line.startswith("python -m pip install --quiet") and "upgrade" not in line]
    assert [line.replace("python -m pip install --quiet ", "pip install ") for line in ci_lines] == readme_lines
    assert "HF_HUB_OFFLINE=1 python -m pytest tests" in README and "HF_HUB_OFFLINE=1 python -m pytest tests" in ci
