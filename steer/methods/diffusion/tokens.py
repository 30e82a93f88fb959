"""Token positions of concepts in a prompt, from the pipeline's tokenizer facts (`TokenizerInfo`).

Positions index the prompt ids as ``encode_prompt`` builds them: 0 is the start token, the words follow, then
the end-of-text token (EOT) and padding up to ``model_max_length``. A concept is a word or phrase of the prompt
(its ids found as a contiguous run) or a position itself (an int, A&E's ``token_indices``). Concepts are given
once for every prompt (a flat list) or per prompt (a list of lists); per-image values repeat each prompt's
``num_images_per_prompt`` times (image b belongs to prompt b // n, ``encode_prompt``'s order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steer.edits.pipeline_facts import TokenizerInfo
from steer.errors import SteerInputError

ARTICLES = {"a", "an", "the"}


def eot_position(tok: TokenizerInfo, ids: Sequence[int]) -> int:
    """Position of the first end-of-text token after SOT (the last position when the prompt was truncated)."""
    for i in range(1, len(ids)):
        if ids[i] == tok.eos_token_id:
            return i
    return len(ids) - 1


def listing(tok: TokenizerInfo, ids: Sequence[int]) -> str:
    """``0: <|startoftext|>, 1: a</w>, …`` up to and including EOT."""
    end = eot_position(tok, ids)
    tokens = tok.tokens(list(ids[: end + 1]))
    return ", ".join(f"{i}: {t}" for i, t in enumerate(tokens))


def _find_run(ids: Sequence[int], run: Sequence[int], used: set[int], stop: int) -> int | None:
    n = len(run)
    for start in range(1, stop - n + 1):
        if list(ids[start : start + n]) == list(run) and not used.intersection(range(start, start + n)):
            return start
    return None


def locate(
    tok: TokenizerInfo,
    ids: Sequence[int],
    item: str | int,
    used: set[int],
    *,
    what: str,
    single_token: bool,
    prompt: str | None,
) -> list[int]:
    """Positions of one concept in the prompt ids.

    A string is tokenised without special tokens and matched as a contiguous id run (SOT = position 0 is never
    matched), first occurrence not overlapping positions already used. An int is a position itself (A&E's
    ``token_indices``). ``single_token``: a word the tokenizer splits into several tokens is an error that names
    the sub-tokens. Raises :class:`SteerInputError` with the prompt's ``index: token`` listing.
    """
    end = eot_position(tok, ids)
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise SteerInputError(f"{what}: {item!r} is neither a word (str) nor a token position (int)")
    if isinstance(item, int):
        if not 1 <= item < end:
            raise SteerInputError(
                f"{what}: token position {item} is outside the prompt's words (1..{end - 1}); prompt tokens: "
                f"{listing(tok, ids)}"
            )
        return [item]
    run = list(tok.encode(item))
    if not run:
        raise SteerInputError(f"{what}: {item!r} tokenises to nothing")
    pieces = tok.tokens(run)
    start = _find_run(ids, run, used, end)
    where = f"in the prompt {prompt!r}" if prompt is not None else "in the prompt"
    if start is None:
        split = f" (tokens {pieces})" if len(run) > 1 else ""
        again = " again (each occurrence is used once)" if _find_run(ids, run, set(), end) is not None else ""
        raise SteerInputError(
            f"{what}: {item!r}{split} is not {where}{again}. Prompt tokens: {listing(tok, ids)}. "
            "Give a word of the prompt, or its position (an int)."
        )
    positions = list(range(start, start + len(run)))
    if single_token and len(run) > 1:
        raise SteerInputError(
            f"{what}: {item!r} is split by the tokenizer into {len(run)} sub-tokens {pieces} at positions "
            f"{positions}; this method needs one token per concept. Pass the position of the sub-token to use "
            f"(e.g. indices=[{positions[-1]}]) or multi_token='mean' to average the sub-tokens' maps."
        )
    return positions


def per_prompt(spec: Sequence[Any], n_prompts: int, what: str) -> list[list[Any]]:
    """A flat list (the same concepts for every prompt) or one list per prompt."""
    items = list(spec)
    if items and all(isinstance(x, (list, tuple)) for x in items):
        if len(items) != n_prompts:
            raise SteerInputError(
                f"{what}: {len(items)} lists given (one per prompt) but the call has {n_prompts} prompt(s)"
            )
        return [list(x) for x in items]
    if any(isinstance(x, (list, tuple)) for x in items):
        raise SteerInputError(f"{what}: mix of lists and single items; give a flat list or one list per prompt")
    return [items for _ in range(n_prompts)]


def resolve_concepts(
    tok: TokenizerInfo,
    prompts: Sequence[str] | None,
    n_prompts: int,
    spec: Sequence[Any],
    *,
    what: str,
    single_token: bool,
) -> list[list[list[int]]]:
    """Per prompt, per concept: its token positions. ``prompts`` None (``prompt_embeds`` given): ints only."""
    out: list[list[list[int]]] = []
    for p, items in enumerate(per_prompt(spec, n_prompts, what)):
        if not items:
            raise SteerInputError(f"{what}: no concepts given for prompt {p}")
        if prompts is None:
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
                raise SteerInputError(
                    f"{what}: words can only be found in a text prompt; this call passed prompt_embeds. "
                    "Pass prompt=..., or give token positions (ints)."
                )
            out.append([[int(x)] for x in items])
            continue
        ids = tok.prompt_ids(prompts[p])
        used: set[int] = set()
        concepts = []
        for item in items:
            positions = locate(tok, ids, item, used, what=what, single_token=single_token, prompt=prompts[p])
            used.update(positions)
            concepts.append(positions)
        out.append(concepts)
    return out


def content_positions(tok: TokenizerInfo, ids: Sequence[int], positions: Sequence[int]) -> list[int]:
    """``positions`` without the articles a/an/the (Detector Guidance's ``detect_tokens="content"``)."""
    tokens = tok.tokens([ids[p] for p in positions])
    kept = [p for p, t in zip(positions, tokens) if t.replace("</w>", "").lower() not in ARTICLES]
    return kept or [positions[-1]]


def labels(tok: TokenizerInfo, prompt: str | None, concepts: list[list[int]]) -> list[str]:
    """Readable concept names for map grids: the concept's tokens (``</w>`` dropped), or its positions."""
    if prompt is None:
        return [str(c) for c in concepts]
    ids = tok.prompt_ids(prompt)
    return ["".join(tok.tokens([ids[q] for q in c])).replace("</w>", " ").strip() for c in concepts]


def images_of(per_prompt_values: list[Any], n_per_prompt: int) -> list[Any]:
    """Expand per-prompt values to per-image values; image b = prompt b // n (encode_prompt's repeat order)."""
    return [v for v in per_prompt_values for _ in range(n_per_prompt)]


def check_prompt_2(what: str, prompts: list[str] | None, prompt_2: Any) -> None:
    """Concepts are found in ``prompt`` (the first tokenizer's); SDXL's ``prompt_2`` must be absent or equal."""
    if prompt_2 is not None and prompts is not None and prompt_2 not in (prompts, prompts[0]):
        raise SteerInputError(f"{what}: prompt_2 must be None or equal to prompt")


__all__ = [
    "check_prompt_2",
    "content_positions",
    "eot_position",
    "images_of",
    "labels",
    "listing",
    "locate",
    "per_prompt",
    "resolve_concepts",
]
