"""Model loading errors say what is wrong, at once (issue 17 B9)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import steer
from steer.errors import EvalInputError
from steer.evals.loading import load_model


def test_a_missing_local_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="no such folder"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(EvalInputError, match="no such folder"):
        load_model("./checkpoints/llava")


def test_an_unsupported_saved_model_is_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(steer.UnsupportedModelError, match="GPT2LMHeadModel checkpoint.*LlavaForConditionalGeneration"):
        load_model(str(tmp_path))


def test_offline_unknown_hub_id_fails_at_once() -> None:
    start = time.perf_counter()
    with pytest.raises(EvalInputError, match="not in the Hugging Face cache while offline"):
        load_model("someone/no-such-model-1234")
    assert time.perf_counter() - start < 5.0  # no network retries
