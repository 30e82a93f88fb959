"""Behaviour did not move: every method x family (defaults and a strong setting), compositions, and every
pipeline method equal the stored fixture (tests/behaviour_cases.py): tokens exactly, tensors to 1e-6 (fp32)."""

from __future__ import annotations

import pytest
import torch
from behaviour_cases import ATOL, FIXTURE, all_cases, run

STORED = torch.load(FIXTURE)


def test_fixture_covers_every_case() -> None:
    assert sorted(STORED) == sorted(all_cases())


@pytest.mark.parametrize("case", all_cases())
def test_outputs_equal_the_stored_fixture(case: str) -> None:
    torch.manual_seed(0)
    now = run(case)
    stored = STORED[case]
    assert sorted(now) == sorted(stored)
    if "latents" in stored:
        torch.testing.assert_close(now["latents"], stored["latents"], atol=ATOL, rtol=0)
        return
    assert torch.equal(now["tokens"], stored["tokens"]), "greedy tokens moved"
    assert torch.equal(now["real"], stored["real"]), "the prefill's sequence layout moved"
    real = stored["real"]
    torch.testing.assert_close(now["logits_last"], stored["logits_last"], atol=ATOL, rtol=0)
    torch.testing.assert_close(now["lse"][real], stored["lse"][real], atol=ATOL, rtol=0)
    assert torch.equal(now["argmax"][real], stored["argmax"][real])
