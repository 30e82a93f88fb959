"""Benchmark protocol constants shared by the evals and the demo model.

The user texts of the CHAIR and POPE generation protocols (specs ``chair.md`` and ``pope.md``): ``steer eval``
asks them, and the demo model (`steer.zoo.demo_model`) is trained on them. This module imports nothing from
steer, so both sides can use it without depending on each other.
"""

from __future__ import annotations

__all__ = ["CHAIR_PROMPT", "POPE_PROMPTS"]

CHAIR_PROMPT = "Please describe this image in detail."
"""The CHAIR user text of OPERA/VISTA/CCA (spec ``chair.md``, generation protocol)."""

POPE_PROMPTS: dict[str, str] = {
    "llava": "{question}\nAnswer the question using a single word or phrase.",
    "vcd": "{question} Please answer this question with one word.",
    "raw": "{question}",
}
"""POPE user texts by name (spec ``pope.md``, prompts and decoding)."""
