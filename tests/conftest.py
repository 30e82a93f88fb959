"""Shared fixtures: every test runs offline on tiny zoo models saved into a per-session folder."""

from __future__ import annotations

import os
import shutil
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run in Triton's CPU interpreter where there is no GPU. It must be chosen before anything
# imports triton (importing torch does when triton is installed), or jit helpers and kernels disagree.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
#: The families added by issue 15 (tests/test_families.py runs every method on them).
NEW_FAMILIES = ("qwen3_vl", "llava_onevision", "gemma3", "internvl", "smolvlm")
ALL_FAMILIES = FAMILIES + NEW_FAMILIES


@pytest.fixture(scope="session", autouse=True)
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("zoo"))
    os.environ["STEER_ZOO_DIR"] = path
    return path


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Tiny models: one intra-op thread is as fast and does not spin against other work on a shared 2-core CPU
    (a module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
