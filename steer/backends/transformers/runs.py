"""Run keys: which forward an edit acts in (``"main"``: the caller's; ``"owner/name"``: an auxiliary run)."""

from __future__ import annotations

from steer.edits.kinds import MAIN


def run_key(owner: str, name: str) -> str:
    """The key of an auxiliary run of ``owner`` named ``name`` (``"main"`` stays ``"main"``)."""
    return MAIN if name == MAIN else f"{owner}/{name}"


__all__ = ["run_key"]
