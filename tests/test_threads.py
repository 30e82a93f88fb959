"""One steered model used from several threads: each thread's call has its own context (same outputs as run
alone, never a mix), and applying or removing a handle while another thread runs the model is a typed error."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import pytest
import torch
from helpers import generate, row_inputs

import steer
from steer import edits, zoo
from steer.backends.transformers.runtime import Runtime

METHODS: dict[str, dict[str, Any]] = {
    "scale_heads": {"alpha": 3.0},
    "image_attention": {"scale": 4.0},
    "var": {"sink_dims": list(range(16)), "tau": 2.5, "p": 0.1, "rho": 0.0, "min_visual_mass": 0.0},
    "vhr": {"alpha": 3.0},
    "vista": {"lam": 0.4},
    "cca": {"trained_checkpoint": True},
    "fastervlm": {"reduction": 0.5},
}


def run_in_threads(jobs: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", list(METHODS))
def test_two_threads_on_one_steered_model_equal_running_alone(method: str) -> None:
    model, processor = zoo.load_tiny("llava")
    a, b = row_inputs(processor, "llava", 0), row_inputs(processor, "llava", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = steer.apply(model, method, **METHODS[method])
    try:
        alone_a, alone_b = generate(model, a, max_new_tokens=5), generate(model, b, max_new_tokens=5)
        torch.set_num_threads(1)  # two threads on two cores; the race, if any, is in Python
        for _ in range(4):
            got_a, got_b = run_in_threads([lambda: generate(model, a, max_new_tokens=5), lambda: generate(model, b, max_new_tokens=5)])
            assert torch.equal(got_a, alone_a) and torch.equal(got_b, alone_b)
    finally:
        handle.remove()
    assert Runtime.of(model) is None


def test_apply_or_remove_during_another_threads_generation_is_refused() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 0)
    ref = generate(model, inputs, max_new_tokens=4)
    entered, release = threading.Event(), threading.Event()

    def wait_once(f: torch.Tensor, e: edits.EditContext) -> None:
        if e.phase == "decode" and not entered.is_set():
            entered.set()
            release.wait(timeout=30)

    handle = steer.apply(model, edits.LogitsTransform(fn=wait_once))
    out: dict[str, torch.Tensor] = {}
    worker = threading.Thread(target=lambda: out.update(tokens=generate(model, inputs, max_new_tokens=4)))
    worker.start()
    assert entered.wait(timeout=30)
    try:
        with pytest.raises(steer.ConcurrentSteeringError, match="running in another thread"):
            steer.apply(model, "scale_heads", alpha=5.0)
        with pytest.raises(steer.ConcurrentSteeringError, match="remove a handle"):
            handle.remove()
    finally:
        release.set()
        worker.join()
    assert torch.equal(out["tokens"], ref)  # the generation was not disturbed
    handle.remove()  # fine once the other thread is done
    assert Runtime.of(model) is None


def test_two_models_in_two_threads() -> None:
    model_a, processor = zoo.load_tiny("llava")
    model_b, _ = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 2)
    with steer.apply(model_a, "scale_heads", alpha=3.0):
        expect_a = generate(model_a, inputs, max_new_tokens=4)
    expect_b = generate(model_b, inputs, max_new_tokens=4)
    with steer.apply(model_a, "scale_heads", alpha=3.0):
        got_a, got_b = run_in_threads([lambda: generate(model_a, inputs, max_new_tokens=4), lambda: generate(model_b, inputs, max_new_tokens=4)])
    assert torch.equal(got_a, expect_a) and torch.equal(got_b, expect_b)
