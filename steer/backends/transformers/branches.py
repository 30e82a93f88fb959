"""Auxiliary branches that follow decoding (``SourceRun(follow=True)``) and distorted images.

A branch is a second sequence per batch row that the language model runs beside the caller's, with its own
KV cache: VCD's noised image (``"distorted"``: the caller's inputs with each image's features recomputed from
distorted pixels), PAI's and M3ID's image-free prompt (``"text_only"``: the adapter's fact), or the caller's
own inputs (``"same"``). It lives in the call's store (``CallStore.backend``) from the prefill on.

Where it runs: a wrapper of the language model's ``forward`` (an instance attribute, so it runs after every
pre-hook of other edits and sees the inputs the model really gets).

* **prefill** (empty cache): the branch's inputs are built; ``sequential``: one extra forward into a new
  ``DynamicCache``; ``batched``: the caller's rows and the branch's rows (left padded to the caller's width) in
  one forward of 2B rows, the caller's cache holding both (rows B..2B-1 are the branch's);
* **each later forward**: the same new tokens (their embeddings), the branch's mask (its prompt's padding, then
  the call's mask over the generated tokens) and positions (the caller's for ``"same"``/``"distorted"``, the
  branch prompt's next positions for ``"text_only"``), sequentially or stacked as at the prefill;
* **beams**: the caller's cache object gets its ``reorder_cache`` wrapped at the prefill: every reorder of the
  caller's rows reorders the branch (its cache, or its half of the shared cache) the same way;
* **logits**: after each forward the branch's last hidden states go through ``lm_head`` in the branch's run, so
  a ``Collect(site="logits", runs=(name,))`` of the method reads them (the positions ``lm_head`` projects for
  the caller; ``"text_only"``: each row's last position).

In a batched forward the edits of the caller act on its rows only (`Runtime.stacked`: the attention function
and the tensor sites split the batch); the branch's rows run unedited, as a sequential branch does.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from steer.backends.transformers.masks import padding_of
from steer.backends.transformers.runs import run_key
from steer.edits.context import CallStore, ForwardFacts
from steer.edits.kinds import MAIN, SourceRun
from steer.errors import ImageLayoutError, InvalidParameterError, MissingImageTokensError, SteerInputError

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime

_DISTORTED = "distorted features"


# --------------------------------------------------------------------------------------------------
# distorted images


def distorted_key(edit: SourceRun) -> str:
    return f"{_DISTORTED}:{run_key(edit.owner, edit.name)}"


def install_distortion(runtime: Runtime, edit: SourceRun) -> None:
    """Encode each call's images a second time from ``edit.distort(pixels)`` (under the guard), next to the
    caller's encoding, and expand them as ``generate`` expands the real ones (beams, return sequences)."""
    assert edit.distort is not None  # SourceRun checks it
    distort = edit.distort
    adapter: Any = runtime.adapter
    owner = adapter.image_encoder
    key = distorted_key(edit)

    def make_encoder(original: Any) -> Any:
        signature = inspect.signature(original)

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            if runtime.run != MAIN:
                return original(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs).arguments
            extra = bound.pop("kwargs", None) or {}
            call = {**bound, **extra}
            pixels = call.get("pixel_values")
            if not isinstance(pixels, torch.Tensor):
                return original(*args, **kwargs)
            images = adapter.image_pixels(call)
            distorted = []
            for index, image in enumerate(images):
                new = distort(image)
                if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(image.shape):
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise InvalidParameterError(
                        f"{edit.owner or 'SourceRun'}: the distortion returned {got} for image {index} of shape "
                        f"{tuple(image.shape)}; return a tensor of the same shape (the image's preprocessed pixels)"
                    )
                distorted.append(new)
            with runtime.running(None), torch.no_grad():  # the second encoding runs unsteered
                noisy = original(**{**call, "pixel_values": adapter.with_image_pixels(call, distorted)})
            store = _store(runtime)
            store.backend[key] = list(noisy.pooler_output)
            deep = getattr(noisy, "deepstack_features", None)  # Qwen3-VL: features added in early decoder layers
            if deep is not None:
                store.backend[_deep(key)] = [list(layer) for layer in deep]
            return original(*args, **kwargs)  # last: steer's image metadata notes the caller's features

        return get_image_features

    runtime.wrap(owner, "get_image_features", make_encoder)

    model: Any = runtime.model
    if hasattr(model, "_expand_multimodal_outputs"):

        def make_expand(original: Any) -> Any:
            signature = inspect.signature(original)

            def expand(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                store = runtime.pending_call()
                if store is None or store.backend.get(key) is None:
                    return out
                features = store.backend[key]
                bound = signature.bind(*args, **kwargs).arguments
                encoded = bound.get("mm_encoder_output") or {}
                real = encoded.get("image") if isinstance(encoded, dict) else None
                if real is None:
                    return out
                twin = copy.copy(real)
                twin.pooler_output = list(features)
                deep = store.backend.get(_deep(key))
                if deep is not None:
                    twin.deepstack_features = [list(layer) for layer in deep]
                original(**{**bound, "mm_encoder_output": {"image": twin}})
                store.backend[key] = list(twin.pooler_output)
                if deep is not None:
                    store.backend[_deep(key)] = [list(layer) for layer in twin.deepstack_features]
                return out

            return expand

        runtime.wrap(model, "_expand_multimodal_outputs", make_expand)


def _deep(key: str) -> str:
    return f"{key}:deepstack"


def _store(runtime: Runtime) -> CallStore:
    """The store of the current call: the forward's, or (before a ``generate``'s prefill) the pending one."""
    if runtime.in_forward:
        return runtime.context.call
    return runtime.pending_call() or runtime.new_pending_call()


def distorted_embeddings(runtime: Runtime, edit: SourceRun, embeds: torch.Tensor, ctx: ForwardFacts) -> torch.Tensor:
    """The prefill's embeddings with every image token's features replaced by the distorted image's."""
    features = ctx.call.backend.get(distorted_key(edit))
    who = edit.owner or "SourceRun(inputs='distorted')"
    if features is None:
        raise MissingImageTokensError(
            f"{who} recomputes the image features from distorted pixels, but this call brought no pixels "
            "(mm_encoder_outputs given by the caller, or the images were pruned by another method). Pass "
            "pixel_values to the model or to generate, and apply pruning methods separately."
        )
    ids = ctx.prompt_ids
    if ids is None:
        raise MissingImageTokensError(f"{who} needs input_ids to find the image tokens")
    video = getattr(runtime.adapter.config, "video_token_id", None)
    if "video_grid_thw" in ctx.inputs or (video is not None and bool((ids == int(video)).any())):
        raise ImageLayoutError(f"{who} distorts still images only; this call holds video tokens")
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features], dim=0).to(embeds.device, embeds.dtype)
    mask = runtime.adapter.image_token_mask(ids).to(embeds.device)
    if int(mask.sum()) != flat.shape[0] or mask.shape != embeds.shape[:2]:
        raise ImageLayoutError(
            f"{who}: {flat.shape[0]} distorted image features for {int(mask.sum())} image tokens "
            f"(image placeholders and images do not match)"
        )
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), flat)


def distorted_visual_inputs(runtime: Runtime, edit: SourceRun, ctx: ForwardFacts, lm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The language-model image inputs besides the embeddings (the adapter's ``lm_visual_inputs``) for the
    distorted images: each per-layer feature input recomputed from the distorted pixels (Qwen3-VL's DeepStack
    features, concatenated over images as the model does); row masks are the prefill's own (``lm_kwargs``: the
    language model's inputs). Empty for models without such inputs."""
    kinds: dict[str, str] = runtime.adapter.lm_visual_inputs
    out = {k: lm_kwargs[k] for k, kind in kinds.items() if kind == "row_mask" and lm_kwargs.get(k) is not None}
    deep = ctx.call.backend.get(_deep(distorted_key(edit)))
    for k, kind in kinds.items():
        if kind == "features" and deep is not None:
            out[k] = [torch.cat(layer, dim=0) for layer in deep]
    return out


Inputs = dict[str, Any]


def explicit_positions(
    runtime: Runtime, positions: torch.Tensor | None, batch: int, width: int, device: Any, past: int = 0
) -> torch.Tensor:
    """Position ids as the language model would use them, with the batch dimension spelled out: [B, T]
    (1-D RoPE) or [R, B, T] (M-RoPE, R = 3 or 4). ``None`` means the model's default ``past .. past + T - 1``."""
    if positions is None:
        positions = torch.arange(past, past + width, device=device)
    positions = positions.to(device)
    if runtime.adapter.position_scheme == "mrope":
        if positions.dim() < 3:
            positions = positions.reshape(-1, width)[None].expand(3, -1, width)
        return positions.expand(positions.shape[0], batch, width)
    return positions.reshape(-1, width).expand(batch, width)


def stacked_visual_inputs(kinds: dict[str, str], rows: list[Inputs]) -> Inputs:
    """The image-feature inputs of stacked rows (``kinds``: the adapter's ``lm_visual_inputs``): a row mask
    gets False rows for the parts without images; features (in row order) are the parts' features in order."""
    out: Inputs = {}
    for key, kind in kinds.items():
        if not any(key in r for r in rows):
            continue
        if kind == "row_mask":
            out[key] = torch.cat(
                [r[key].to(r["image"].device).bool() if key in r else torch.zeros_like(r["image"]) for r in rows], dim=0
            )
        else:  # features: one entry per layer, each [visual tokens, D] in row order
            present = [r[key] for r in rows if key in r]
            out[key] = present[0] if len(present) == 1 else [torch.cat(list(f), dim=0) for f in zip(*present)]
    return out



# --------------------------------------------------------------------------------------------------
# the branch


@dataclass
class Branch:
    """One branch's state for one call (``CallStore.backend["branch:<key>"]``)."""

    rows: int  # B: the caller's rows
    batched: bool
    prompt_mask: torch.Tensor  # [B, P'] long: the branch prompt's real tokens
    main_prompt: int  # P: the caller's prompt width
    next_pos: torch.Tensor  # [B] the branch's next position ("text_only")
    main_len: int  # the caller's cache length expected at the next call
    cache: Any = None  # sequential: the branch's own cache
    facts: ForwardFacts | None = None


def install_branch(runtime: Runtime, edit: SourceRun) -> None:
    """``SourceRun(follow=True)``: wrap the language model's forward (see the module docstring)."""
    if "distorted" in edit.parts():
        install_distortion(runtime, edit)
    branches: list[SourceRun] = runtime.shared("branches", list)
    branches.append(edit)
    runner = BranchRunner(runtime, edit, branches)
    runtime.wrap(runtime.adapter.text_model, "forward", runner.wrap)


class BranchRunner:
    """The functions one branch's wrapper calls."""

    def __init__(self, runtime: Runtime, edit: SourceRun, branches: list[SourceRun]) -> None:
        self.runtime = runtime
        self.edit = edit
        self.branches = branches
        self.key = run_key(edit.owner, edit.name)
        self.part = edit.parts()[0]
        self.adapter: Any = runtime.adapter

    def wrap(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            runtime = self.runtime
            if runtime.run != MAIN or args or runtime.main_rows is not None:
                return original(*args, **kwargs)
            ctx = runtime.context
            if ctx.phase == "prefill":
                return self.prefill(original, kwargs, ctx)
            return self.decode(original, kwargs, ctx)

        return forward

    # ---- helpers --------------------------------------------------------------------------------------
    def _embeds(self, kwargs: dict[str, Any]) -> torch.Tensor:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.adapter.embed_tokens(kwargs["input_ids"])
        return embeds

    def _cache_kw(self, kwargs: dict[str, Any]) -> str:
        return "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"

    def _uses_cache(self, kwargs: dict[str, Any]) -> bool:
        if kwargs.get(self._cache_kw(kwargs)) is not None:
            return True
        use = kwargs.get("use_cache")
        if use is None:
            use = getattr(self.adapter.text_config, "use_cache", True)
        return bool(use)

    def _can_batch(self, kwargs: dict[str, Any], cache: Any) -> bool:
        if self.edit.batch == "sequential" or len(self.branches) > 1:
            return False
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return False
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if cache is not None and not (
            isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
        ):
            return False
        return True

    def _like(self, branch_pos: torch.Tensor, main_pos: torch.Tensor) -> torch.Tensor:
        """Branch positions with the caller's leading rows (M-RoPE [3, ...] and [4, ...] (text row first))."""
        if self.adapter.position_scheme != "mrope":
            return branch_pos
        if branch_pos.dim() == 2:
            branch_pos = branch_pos[None].expand(main_pos.shape[0], -1, -1)
        if branch_pos.shape[0] == main_pos.shape[0]:
            return branch_pos
        if branch_pos.shape[0] > main_pos.shape[0]:
            return branch_pos[-main_pos.shape[0] :]
        return torch.cat([branch_pos[:1], branch_pos], dim=0)

    def _facts(self, ctx: ForwardFacts, batch: int, q_len: int, past: int, padding: torch.Tensor) -> ForwardFacts:
        return dataclasses.replace(
            ctx, phase="prefill" if past == 0 else "decode", batch_size=batch, query_len=q_len,
            past_length=past, padding_mask=padding, derived={},
        )  # fmt: skip

    def _logits(self, hidden: torch.Tensor, ctx: ForwardFacts, facts: ForwardFacts) -> None:
        """The branch's final logits (``lm_head`` in the branch's run, where its ``Collect(site="logits")`` reads)."""
        if self.part == "text_only":
            hidden = hidden[:, -1:]
        else:
            keep: Any = ctx.logits_to_keep
            if isinstance(keep, int):
                hidden = hidden if keep == 0 else hidden[:, -keep:]
            else:
                hidden = hidden[:, keep.to(hidden.device)]
        with self.runtime.running(self.key, facts), torch.no_grad():
            self.adapter.lm_head(hidden)

    def _visual_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The caller's image inputs besides the embeddings (the adapter's ``lm_visual_inputs``: DeepStack)."""
        return {k: kwargs[k] for k in self.adapter.lm_visual_inputs if kwargs.get(k) is not None}

    def _stacked_forward(self, original: Any, new: dict[str, Any], batch: int, ctx: ForwardFacts, facts: ForwardFacts) -> Any:
        """One forward of the caller's ``batch`` rows and the branch's below them (the caller's edits on its rows
        only); the branch's logits go to its collects, the output keeps the caller's rows."""
        with self.runtime.stacked(batch):
            out = original(**new)
        hidden = out.last_hidden_state
        self._logits(hidden[batch:], ctx, facts)
        out.last_hidden_state = hidden[:batch]
        return out

    def _wrap_reorder(self, cache: Any, state: Branch) -> None:
        """Every reorder of the caller's cache reorders the branch the same way (``edit.reorder``)."""
        if cache is None or not hasattr(cache, "reorder_cache"):
            return
        original = cache.reorder_cache
        follow = self.edit.reorder

        def reorder_cache(beam_idx: torch.LongTensor) -> Any:
            idx = beam_idx.to(torch.long)
            if state.batched:
                rest = idx + state.rows if follow else torch.arange(state.rows, 2 * state.rows, device=idx.device)
                return original(torch.cat([idx, rest.to(idx.device)]))
            out = original(beam_idx)
            if follow and state.cache is not None:
                state.cache.reorder_cache(beam_idx)
            if follow:
                state.prompt_mask = state.prompt_mask[idx.to(state.prompt_mask.device)]
                state.next_pos = state.next_pos[idx.to(state.next_pos.device)]
            return out

        cache.__dict__["reorder_cache"] = reorder_cache

    # ---- prefill ---------------------------------------------------------------------------------------
    def _branch_inputs(self, kwargs: dict[str, Any], ctx: ForwardFacts, embeds: torch.Tensor, width: int | None) -> dict[str, Any]:
        """The branch's prompt: embeddings [B, T'], 2-D mask, explicit positions (``None``: the caller's) and
        ``visual``: its image inputs besides the embeddings (the adapter's ``lm_visual_inputs``)."""
        batch, length = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        main_mask = mask.long() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if self.part == "text_only":
            ids = ctx.prompt_ids
            if ids is None:
                raise MissingImageTokensError(
                    f"{self.edit.owner or 'SourceRun'} builds the prompt without its image from input_ids; the model was "
                    "called with inputs_embeds only"
                )
            real = ctx.padding_mask
            if real is None or tuple(real.shape) != tuple(ids.shape):
                real = padding_of(main_mask, batch, length)
            with self.runtime.running(None):
                built = self.adapter.text_only_inputs(ids, real, width)
            return {
                "inputs_embeds": built["inputs_embeds"].to(embeds.dtype),
                "attention_mask": built["attention_mask"].long(),
                "position_ids": built["position_ids"],
                "visual": {},  # no image: no image inputs besides the embeddings
            }
        if self.part == "same":
            branch_embeds = embeds
            visual = self._visual_inputs(kwargs)
        else:
            branch_embeds = distorted_embeddings(self.runtime, self.edit, embeds, ctx)
            visual = distorted_visual_inputs(self.runtime, self.edit, ctx, kwargs)
        if main_mask is None:
            main_mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        return {
            "inputs_embeds": branch_embeds, "attention_mask": main_mask, "position_ids": kwargs.get("position_ids"),
            "visual": visual,
        }  # fmt: skip

    def prefill(self, original: Any, kwargs: dict[str, Any], ctx: ForwardFacts) -> Any:
        runtime = self.runtime
        embeds = self._embeds(kwargs)
        batch, length = embeds.shape[:2]
        ck = self._cache_kw(kwargs)
        cache = kwargs.get(ck)
        follows = self._uses_cache(kwargs)
        batched = self.edit.batch == "batched" or (self.edit.batch == "auto" and self._can_batch(kwargs, cache))
        if batched and not self._can_batch(kwargs, cache) and self.edit.batch == "batched":
            raise InvalidParameterError(
                f"{self.edit.owner or 'SourceRun'}: batch='batched' needs a dynamic cache, a 2-D attention mask, one "
                "following branch and no attention/hidden-state outputs; use batch='auto' or 'sequential'"
            )
        branch = self._branch_inputs(kwargs, ctx, embeds, length if batched else None)
        if self.part == "text_only" and branch["inputs_embeds"].shape[1] > length:  # pragma: no cover - it is shorter
            batched = False
        b_mask = branch["attention_mask"].to(embeds.device)
        main_mask = kwargs.get("attention_mask")
        b_pos = branch["position_ids"]
        if self.part == "text_only":
            text_row = b_pos if b_pos.dim() == 2 else b_pos[0]
            next_pos = text_row.amax(dim=-1) + 1  # the last real position + 1
        else:
            next_pos = torch.zeros(batch, dtype=torch.long, device=embeds.device)
        state = Branch(
            rows=batch, batched=batched, prompt_mask=b_mask, main_prompt=length, next_pos=next_pos.to(embeds.device),
            main_len=length,
        )  # fmt: skip
        facts = self._facts(ctx, batch, b_mask.shape[1], 0, b_mask.bool())
        if batched:
            main_pos = explicit_positions(self.runtime, kwargs.get("position_ids"), batch, length, embeds.device)
            pos = main_pos if b_pos is None else self._like(b_pos.to(embeds.device), main_pos)
            two_mask = main_mask if isinstance(main_mask, torch.Tensor) else torch.ones_like(b_mask)
            if follows and cache is None:
                cache = DynamicCache(config=self.adapter.model.config)
            new = {k: v for k, v in kwargs.items() if k not in ("input_ids", "past_key_values", "cache")}
            new.update(
                inputs_embeds=torch.cat([embeds, branch["inputs_embeds"]], dim=0),
                attention_mask=torch.cat([two_mask.to(b_mask.device).long(), b_mask], dim=0),
                position_ids=torch.cat([main_pos, pos], dim=-2),
            )
            kinds = self.adapter.lm_visual_inputs
            main_visual = self._visual_inputs(kwargs)
            if main_visual or branch["visual"]:  # DeepStack: the rows' features and row masks, stacked
                rows = [
                    {**main_visual, "image": torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)},
                    {**branch["visual"], "image": torch.zeros_like(b_mask, dtype=torch.bool)},
                ]
                new.update(stacked_visual_inputs(kinds, rows))
            if cache is not None:
                new[ck] = cache
            out = self._stacked_forward(original, new, batch, ctx, facts)
            cache = getattr(out, "cache", None) if follows else None
            if cache is None and follows:
                cache = getattr(out, "past_key_values", None)
        else:
            b_kwargs = {"inputs_embeds": branch["inputs_embeds"], "attention_mask": b_mask, "position_ids": b_pos}
            b_kwargs.update(branch["visual"])
            if self.part != "text_only" and kwargs.get("attention_mask") is not None:
                # the caller's rows and the branch's have one layout: the mask the model built for the caller
                # (Gemma 3: a mapping with bidirectional image blocks and sliding windows) is the branch's too
                b_kwargs["attention_mask"] = kwargs["attention_mask"]
            if follows:
                state.cache = DynamicCache(config=self.adapter.model.config)
                b_kwargs.update(cache=state.cache, use_cache=True)
            else:
                b_kwargs["use_cache"] = False
            with runtime.running(self.key, facts), torch.no_grad():
                b_out = original(**b_kwargs)
            self._logits(b_out.last_hidden_state, ctx, facts)
            out = original(**kwargs)
            if follows and cache is None:
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        state.facts = facts
        if follows:
            ctx.call.backend[f"branch:{self.key}"] = state
            self._wrap_reorder(cache, state)
        return out

    # ---- decode ----------------------------------------------------------------------------------------
    def decode(self, original: Any, kwargs: dict[str, Any], ctx: ForwardFacts) -> Any:
        runtime = self.runtime
        state: Branch | None = ctx.call.backend.get(f"branch:{self.key}")
        ck = self._cache_kw(kwargs)
        cache = kwargs.get(ck)
        past = int(cache.get_seq_length()) if cache is not None else ctx.past_length
        who = self.edit.owner or "SourceRun(follow=True)"
        if state is None:
            raise SteerInputError(
                f"{who}: this forward continues a cache that was filled without {who}'s auxiliary branch (the prefill "
                "ran before the method was applied, or with it disabled). Run the prefill with the method applied."
            )
        if past != state.main_len:
            raise SteerInputError(
                f"{who}: this forward continues a cache of length {past}, but the auxiliary branch follows the call's "
                f"cache at length {state.main_len}; decode from the cache of the last call, one step after another"
            )
        embeds = self._embeds(kwargs)
        batch, q_len = embeds.shape[:2]
        if batch != state.rows:
            raise SteerInputError(
                f"{who}: {batch} rows in this decode step, {state.rows} at the prefill; the batch must keep its rows"
            )
        mask = kwargs.get("attention_mask")
        main_mask = (
            mask.long() if isinstance(mask, torch.Tensor) and mask.dim() == 2
            else torch.ones(batch, past + q_len, dtype=torch.long, device=embeds.device)
        )  # fmt: skip
        generated = main_mask[:, state.main_prompt :].to(state.prompt_mask.device)
        b_mask = torch.cat([state.prompt_mask, generated], dim=1)
        main_pos = explicit_positions(self.runtime, kwargs.get("position_ids"), batch, q_len, embeds.device, past)
        if self.part == "text_only":
            steps = torch.arange(q_len, device=embeds.device)
            b_pos1 = state.next_pos.to(embeds.device)[:, None] + steps[None, :]
            b_pos: torch.Tensor | None = self._like(b_pos1, main_pos)
        else:
            b_pos = kwargs.get("position_ids")
        b_past = past if state.batched else int(state.cache.get_seq_length())
        facts = self._facts(ctx, batch, q_len, b_past, b_mask.bool())
        if state.batched:
            pos = main_pos if b_pos is None else b_pos.to(embeds.device)
            new = {k: v for k, v in kwargs.items() if k not in ("input_ids", "past_key_values", "cache")}
            new.update(
                inputs_embeds=torch.cat([embeds, embeds], dim=0),
                attention_mask=torch.cat([main_mask.to(b_mask.device), b_mask], dim=0),
                position_ids=torch.cat([main_pos, pos], dim=-2),
            )
            new[ck] = cache
            out = self._stacked_forward(original, new, batch, ctx, facts)
        else:
            b_kwargs = {
                "inputs_embeds": embeds, "attention_mask": b_mask, "position_ids": b_pos, "cache": state.cache,
                "use_cache": True,
            }  # fmt: skip
            if self.part != "text_only" and kwargs.get("attention_mask") is not None:
                b_kwargs["attention_mask"] = kwargs["attention_mask"]  # one layout: the caller's mask (above)
            with runtime.running(self.key, facts), torch.no_grad():
                b_out = original(**b_kwargs)
            self._logits(b_out.last_hidden_state, ctx, facts)
            out = original(**kwargs)
        state.main_len = past + q_len
        state.next_pos = state.next_pos + q_len
        state.facts = facts
        return out


def branch_state(store: CallStore, key: str) -> Branch | None:
    """A branch's state in a call's store (tests, benchmarks)."""
    return store.backend.get(f"branch:{key}")


__all__ = ["Branch", "BranchRunner", "branch_state", "distorted_embeddings", "install_branch", "install_distortion"]
