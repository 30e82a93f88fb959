"""The beam search of a :class:`~steer.edits.kinds.BeamLookahead` edit, run through ``generate``'s
``custom_generate`` hook: ``generate`` does its own input preparation (beam expansion, image encoding, cache,
logits processors, stopping criteria), then calls :func:`beam_lookahead_loop`, which

1. runs the joint prefill (``model._prefill``) and splits the cache per sample (one beam loop per sample, so a
   rollback of one sample leaves the others alone; a batch equals its samples run alone);
2. per step: each running beam's top-C candidates of its raw logits; when the policy asks, a look-ahead
   forward gives each candidate's attention row at the chosen layer (steer's attention function collects
   the probabilities of the new query rows: max over heads, divided by the row sum), ``"tree"`` (one forward
   of nb·C query tokens at one position, a 4-D mask letting candidate c see its beam's cache and itself; the
   chosen candidates' K/V and logits are kept, so no other forward) or ``"sequential"`` (C one-token forwards,
   each cropped off again, then a forward of the chosen tokens);
3. the policy's scores -> ``log_softmax`` over the candidates -> the logits processors -> the stock beam
   bookkeeping (``_get_top_k_continuations``, ``_get_running_beams_for_next_iteration``,
   ``_update_finished_beams``, ``_check_early_stop_heuristic``; private API, pinned by a test);
4. a rollback (the policy's) restores the snapshot of an earlier step (running and finished beams, their
   rows, the growing mask/positions), crops the cache to the prompt and replays the restored prefixes in one
   forward, and redoes that step over the full vocabulary with the pairs (parent beam, token) chosen there in
   every earlier pass banned (``-inf``).

The caller's ``model.generate`` is a wrapper that adds ``custom_generate=`` (an instance attribute removed on
``remove()``); no transformers generation code is copied.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerationMixin

from steer.backends.transformers.runs import run_key
from steer.edits.kinds import MAIN, BeamLookahead, BeamPolicy, BeamStep, Collect
from steer.errors import DecodingModeError, IncompatibleMethodsError

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime

ROWS = "__beam_rows__"
_BEAM_HELPERS = (
    "_prefill",
    "prepare_inputs_for_generation",
    "_update_model_kwargs_for_generation",
    "_get_top_k_continuations",
    "_get_running_beams_for_next_iteration",
    "_update_finished_beams",
    "_check_early_stop_heuristic",
    "_beam_search_has_unfinished_sequences",
    "_flatten_beam_dim",
    "_unflatten_beam_dim",
)
_REFUSED_OUTPUTS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")


def head_max_rows(probs: Tensor, ectx: Any = None) -> Tensor:
    """[B, H, Lq, Lk] probabilities -> [B, Lq, Lk]: the max over query heads, divided by its sum over keys."""
    m = probs.amax(dim=1)
    return m / m.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)


def install_beam_lookahead(runtime: Runtime, edit: BeamLookahead) -> None:
    if runtime.shared("branches", list):
        raise IncompatibleMethodsError(
            f"{edit.owner or 'BeamLookahead'} runs its own beam loop (look-ahead forwards, cache crops and replays); "
            "it cannot carry an auxiliary branch that follows decoding (VCD, PAI's contrast, M3ID). Apply them separately."
        )
    layer = edit.layer + runtime.adapter.num_layers if edit.layer < 0 else edit.layer
    collect = Collect(name=ROWS, site="layer.attn.probs", layers=[layer], fn=head_max_rows, phase="decode")
    collect.owner = edit.owner
    runtime.add_attention_edit(layer, collect)
    missing = [name for name in _BEAM_HELPERS if not hasattr(GenerationMixin, name)]
    if missing:  # pragma: no cover - pinned by tests/test_opera.py for the tested transformers versions
        import transformers

        raise IncompatibleMethodsError(
            f"{edit.owner or 'BeamLookahead'} reuses transformers' beam helpers, and transformers "
            f"{transformers.__version__} lacks {', '.join(missing)}"
        )

    def make(original: Any) -> Any:
        def generate(*args: Any, **kwargs: Any) -> Any:
            if runtime.run != MAIN or kwargs.get("custom_generate") is not None:
                return original(*args, **kwargs)
            who = edit.owner or "BeamLookahead"
            for name in ("assistant_model", "streamer", "prefix_allowed_tokens_fn"):
                if kwargs.get(name) is not None:
                    raise DecodingModeError(f"{who} runs its own beam loop; it does not take {name}")
            loop = functools.partial(beam_lookahead_loop, runtime=runtime, edit=edit, layer=layer)
            functools.update_wrapper(loop, beam_lookahead_loop)
            return original(*args, custom_generate=loop, **kwargs)

        return generate

    runtime.wrap(runtime.model, "generate", make)


# --------------------------------------------------------------------------------------------------
# the loop


def beam_lookahead_loop(
    model: Any,
    input_ids: Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    *,
    runtime: Runtime,
    edit: BeamLookahead,
    layer: int,
    **model_kwargs: Any,
) -> Any:
    """``custom_generate`` callable (see the module docstring)."""
    gc = generation_config
    who = edit.owner or "BeamLookahead"
    nb = int(gc.num_beams or 1)
    if nb < 2:
        raise DecodingModeError(
            f"{who} is a beam search: pass num_beams >= 2 to generate (the official setting is num_beams=5)"
        )
    if gc.do_sample:
        raise DecodingModeError(f"{who} is a deterministic beam search; pass do_sample=False")
    refused = [name for name in _REFUSED_OUTPUTS if getattr(gc, name, False)]
    if refused:
        raise DecodingModeError(
            f"{who} cannot return {', '.join(refused)} (ill-defined under rollbacks); return_dict_in_generate gives "
            "sequences and sequences_scores"
        )
    if gc.prefill_chunk_size is not None:
        raise DecodingModeError(f"{who} needs the whole prompt in one prefill (prefill_chunk_size=None)")
    batch = input_ids.shape[0] // nb
    prompt = input_ids.shape[1]
    outputs = model._prefill(input_ids, gc, model_kwargs)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
    del outputs
    cache = model_kwargs.get("cache")
    if cache is None or not (isinstance(cache, DynamicCache) and all(type(x) is DynamicLayer for x in cache.layers)):
        raise DecodingModeError(f"{who} needs a dynamic KV cache (the default cache of generate)")
    make_policy = edit.policy(batch)
    policies: list[BeamPolicy] = []
    results: list[tuple[Tensor, Tensor]] = []
    image = runtime.adapter.image_token_mask(input_ids)
    for s in range(batch):
        rows = torch.arange(s * nb, (s + 1) * nb, device=input_ids.device)
        kwargs = _select_rows(model_kwargs, rows, batch * nb, model.config)
        policy = make_policy(s)
        policies.append(policy)
        loop = SampleLoop(
            model, runtime, edit, policy, logits_processor, stopping_criteria, gc,
            input_ids[rows], logits[rows], kwargs, image[s * nb], s, batch,
        )  # fmt: skip
        results.append(loop.run())
    if edit.on_done is not None:
        edit.on_done(policies)
    pad = gc._pad_token_tensor
    eos = gc._eos_token_tensor
    fill = int(pad) if pad is not None else (int(eos.flatten()[0]) if eos is not None else 0)
    length = max(seq.shape[1] for seq, _ in results)
    sequences = torch.cat(
        [torch.nn.functional.pad(seq, (0, length - seq.shape[1]), value=fill) for seq, _ in results], dim=0
    )
    if gc.return_dict_in_generate:
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences,  # type: ignore[arg-type]  # a LongTensor
            sequences_scores=torch.cat([scores for _, scores in results], dim=0),
            cache=None,
        )  # fmt: skip
    del prompt
    return sequences


def _select_rows(kwargs: dict[str, Any], rows: Tensor, total: int, config: Any) -> dict[str, Any]:
    """The model kwargs of one sample's beams: tensors with the batch as first dim (positions: [R, B, T] too)
    sliced, the dynamic cache split (a new cache holding those rows)."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "cache" and value is not None:
            if total == rows.numel():
                out[key] = value
                continue
            out[key] = DynamicCache(
                ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in value.layers], config=config
            )
        elif isinstance(value, Tensor) and key == "position_ids" and value.dim() == 3:
            out[key] = value[:, rows]
        elif isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == total and total != rows.numel():
            out[key] = value[rows]
        else:
            out[key] = value
    return out


@dataclass
class Snapshot:
    """The decoding state before one step (what a rollback restores)."""

    cur_len: int
    running_sequences: Tensor
    running_beam_scores: Tensor
    running_beam_indices: Tensor
    sequences: Tensor
    beam_scores: Tensor
    beam_indices: Tensor
    is_sent_finished: Tensor
    early: Tensor
    hits: Tensor
    logits: Tensor
    history: list[Tensor]
    kwargs: dict[str, Any]


@dataclass
class SampleLoop:
    """One sample's beam loop."""

    model: Any
    runtime: Runtime
    edit: BeamLookahead
    policy: BeamPolicy
    processors: Any
    stopping: Any
    gc: Any
    input_ids: Tensor  # [nb, P]
    logits: Tensor  # [nb, V] raw logits after the prompt
    kwargs: dict[str, Any]
    image_keys: Tensor  # [P]
    sample: int
    batch_size: int
    snapshots: dict[int, Snapshot] = field(default_factory=dict)
    chosen: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    bans: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    replay_error: float = 0.0
    replays: int = 0

    # ---- forwards ---------------------------------------------------------------------------------------
    def _rows(self) -> Tensor | None:
        """The attention rows the last forward collected ([nb, Lq, Lk]), taken out of the call store."""
        store = self.runtime.context.call.collected.pop((self.edit.owner, ROWS), None)
        if not store:
            return None
        return next(iter(store.values()))

    def _forward(self, sequences: Tensor, new: int, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Feed the last ``new`` tokens of ``sequences`` [nb, L]; returns the last position's logits and rows."""
        inputs = self.model.prepare_inputs_for_generation(sequences, next_sequence_length=new, **kwargs)
        out = self.model(**inputs, return_dict=True)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        return logits, self._rows()

    def _tree(self, sequences: Tensor, candidates: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
        """One forward of the nb·C candidates at the next position, each seeing its beam's cache and itself.
        Returns their logits [nb, C, V], their rows [nb, C, L+1] and L (the cache length before)."""
        model, cache = self.model, kwargs["cache"]
        nb, count = candidates.shape
        length = int(cache.get_seq_length())
        device = candidates.device
        mask2d = kwargs.get("attention_mask")
        real = (
            mask2d[:, :length].bool() if isinstance(mask2d, Tensor)
            else torch.ones(nb, length, dtype=torch.bool, device=device)
        )  # fmt: skip
        allowed = torch.cat(
            [real[:, None, :].expand(nb, count, length), torch.eye(count, dtype=torch.bool, device=device)[None].expand(nb, -1, -1)],
            dim=2,
        )[:, None]
        dtype = model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        positions = kwargs.get("position_ids")
        if positions is None:
            pos: Tensor = torch.full((nb, count), length, dtype=torch.long, device=device)
        else:
            pos = positions[..., -1:].expand(*positions.shape[:-1], count)
        out = model(
            input_ids=candidates, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
            logits_to_keep=0, return_dict=True,
        )  # fmt: skip
        rows = self._rows()
        assert rows is not None  # the collect runs on every decode forward
        own = torch.arange(count, device=device)
        rows = torch.cat([rows[:, :, :length], rows[:, own, length + own][..., None]], dim=-1)
        del sequences
        return out.logits.to(dtype=torch.float32), rows, length

    @staticmethod
    def _keep_candidates(cache: Any, parents: Tensor, picked: Tensor, length: int) -> None:
        """Tree look-ahead: each new beam's cache = its parent's first ``length`` keys + its candidate's key."""
        for layer in cache.layers:
            keys = layer.keys.index_select(0, parents)
            values = layer.values.index_select(0, parents)
            index = (length + picked)[:, None, None, None].expand(-1, keys.shape[1], 1, keys.shape[3])
            layer.keys = torch.cat([keys[:, :, :length], keys.gather(2, index)], dim=2)
            layer.values = torch.cat([values[:, :, :length], values.gather(2, index)], dim=2)

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> tuple[Tensor, Tensor]:
        model, gc, edit = self.model, self.gc, self.edit
        nb, prompt = self.input_ids.shape
        max_length = int(gc.max_length)
        eos = gc._eos_token_tensor
        n_eos = eos.shape[0] if eos is not None else 0
        keep = max(2, 1 + n_eos) * nb
        top_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)]).to(
            self.input_ids.device
        )
        pad, eos_first = gc._pad_token_tensor, (eos.flatten()[0] if eos is not None else None)
        fill = pad if pad is not None else (eos_first if eos_first is not None else -1)
        device = self.input_ids.device
        running_sequences = torch.full((1, nb, max_length), int(fill), dtype=torch.int64, device=device)
        running_sequences[:, :, :prompt] = self.input_ids[None]
        sequences = running_sequences.clone()
        running_beam_scores = torch.zeros((1, nb), dtype=torch.float, device=device)
        running_beam_scores[:, 1:] = -1e9
        beam_scores = torch.full((1, nb), -1e9, dtype=torch.float, device=device)
        is_sent_finished = torch.zeros((1, nb), dtype=torch.bool, device=device)
        early = torch.ones((1, 1), dtype=torch.bool, device=device)
        hits = torch.zeros((1, nb), dtype=torch.bool, device=device)
        running_beam_indices = torch.full((1, nb, max_length - prompt), -1, dtype=torch.int32, device=device)
        beam_indices = running_beam_indices.clone()
        kwargs = self.kwargs
        cache = kwargs["cache"]
        logits = self.logits
        history: list[Tensor] = []
        cur_len = prompt
        redo: int | None = None
        count = min(edit.candidates, logits.shape[-1])
        finished = False
        while not finished:
            step = cur_len - prompt
            self.snapshots[step] = Snapshot(
                cur_len, running_sequences, running_beam_scores, running_beam_indices, sequences, beam_scores,
                beam_indices, is_sent_finished, early, hits, logits, list(history), dict(kwargs),
            )  # fmt: skip
            flat = running_sequences[0, :, :cur_len]
            tree: tuple[Tensor, Tensor, int] | None = None
            rows: Tensor | None = None
            if redo == step:
                scores = logits.clone()
                for parent, token in self.bans.get(step, ()):
                    scores[parent, token] = float("-inf")
                log_probs = torch.log_softmax(scores, dim=-1)
                self.policy.redone(step)
                redo = None
            else:
                candidates = logits.topk(count, dim=-1).indices  # [nb, C]
                if self.policy.needs_rows(step):
                    if edit.lookahead == "tree":
                        tree = self._tree(flat, candidates, kwargs)
                        rows = tree[1]
                    else:
                        rows = self._sequential(flat, candidates, kwargs)
                view = BeamStep(
                    step=step, prompt_len=prompt, logits=logits, candidates=candidates, rows=rows,
                    history=history, image_keys=self.image_keys, sample=self.sample, batch_size=self.batch_size,
                )  # fmt: skip
                y = self.policy.scores(view).to(device=logits.device, dtype=torch.float32)
                back = self.policy.rollback(step)
                if back is not None and back <= step and back in self.snapshots:
                    if tree is not None:
                        cache.crop(-count)
                    self._rollback(back)
                    snap = self.snapshots[back]
                    (cur_len, running_sequences, running_beam_scores, running_beam_indices, sequences, beam_scores,
                     beam_indices, is_sent_finished, early, hits) = (
                        snap.cur_len, snap.running_sequences, snap.running_beam_scores, snap.running_beam_indices,
                        snap.sequences, snap.beam_scores, snap.beam_indices, snap.is_sent_finished, snap.early,
                        snap.hits,
                    )  # fmt: skip
                    history, kwargs = list(snap.history), dict(snap.kwargs)
                    logits = self._replay(running_sequences[0, :, :cur_len], back, prompt, kwargs, snap.logits)
                    redo = back
                    continue
                full = torch.full_like(logits, float("-inf")).scatter(1, candidates, y)
                log_probs = torch.log_softmax(full, dim=-1)
            log_probs = self.processors(flat, log_probs)
            accumulated = (log_probs[None] + running_beam_scores[:, :, None]).reshape(1, -1)
            topk_log_probs, topk_sequences, topk_beam_indices = model._get_top_k_continuations(
                accumulated_log_probs=accumulated, running_sequences=running_sequences,
                running_beam_indices=running_beam_indices, cur_len=cur_len, decoder_prompt_len=prompt,
                do_sample=False, beams_to_keep=keep, num_beams=nb, batch_size=1,
            )  # fmt: skip
            hits = self.stopping(model._flatten_beam_dim(topk_sequences[:, :, : cur_len + 1]), None)
            hits = model._unflatten_beam_dim(hits, 1, keep)
            running_sequences, running_beam_scores, running_beam_indices = model._get_running_beams_for_next_iteration(
                topk_log_probs=topk_log_probs, topk_running_sequences=topk_sequences,
                topk_running_beam_indices=topk_beam_indices, next_token_hits_stopping_criteria=hits, num_beams=nb,
            )  # fmt: skip
            sequences, beam_scores, beam_indices, is_sent_finished = model._update_finished_beams(
                sequences=sequences, topk_running_sequences=topk_sequences, beam_scores=beam_scores,
                topk_log_probs=topk_log_probs, beam_indices=beam_indices, topk_running_beam_indices=topk_beam_indices,
                is_early_stop_heuristic_unsatisfied=early, is_sent_finished=is_sent_finished,
                next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_mask, num_beams=nb, cur_len=cur_len,
                decoder_prompt_len=prompt, length_penalty=gc.length_penalty, early_stopping=gc.early_stopping,
            )  # fmt: skip
            parents = running_beam_indices[0, :, cur_len - prompt].long()
            tokens = running_sequences[0, :, cur_len]
            self.chosen[step] = list(zip(parents.tolist(), tokens.tolist()))
            cur_len += 1
            early = model._check_early_stop_heuristic(
                is_early_stop_heuristic_unsatisfied=early, running_beam_scores=running_beam_scores,
                beam_scores=beam_scores, is_sent_finished=is_sent_finished, cur_len=cur_len, max_length=max_length,
                decoder_prompt_len=prompt, early_stopping=gc.early_stopping, length_penalty=gc.length_penalty,
            )  # fmt: skip
            finished = not bool(
                model._beam_search_has_unfinished_sequences(early, is_sent_finished, hits, gc.early_stopping)
            )
            history = [h.index_select(0, parents) for h in history]
            if finished:
                break
            if tree is not None:
                tree_logits, tree_rows, length = tree
                picked = _candidate_index(candidates, parents, tokens)
                self._keep_candidates(cache, parents, picked, length)
                logits = tree_logits[parents, picked]
                history.append(tree_rows[parents, picked])
                kwargs = model._update_model_kwargs_for_generation(
                    _CacheOnly(cache), kwargs, is_encoder_decoder=False
                )
            else:
                cache.reorder_cache(parents)
                logits, new_rows = self._forward(running_sequences[0, :, :cur_len], 1, kwargs)
                if new_rows is not None:
                    history.append(new_rows[:, -1])
                kwargs = model._update_model_kwargs_for_generation(_CacheOnly(cache), kwargs, is_encoder_decoder=False)
        nrs = int(gc.num_return_sequences or 1)
        out_sequences = sequences[0, :nrs]
        out_scores = beam_scores[0, :nrs]
        out_indices = beam_indices[0, :nrs]
        generated = int(((out_indices + 1).bool()).sum(dim=1).max())
        return out_sequences[:, : prompt + generated], out_scores

    def _sequential(self, flat: Tensor, candidates: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """C one-token forwards (candidate c of every beam), each cropped off the cache again: rows [nb, C, L+1]."""
        cache = kwargs["cache"]
        rows = []
        for c in range(candidates.shape[1]):
            sequence = torch.cat([flat, candidates[:, c : c + 1]], dim=1)
            _, row = self._forward(sequence, 1, kwargs)
            cache.crop(-1)
            assert row is not None  # the collect runs on every decode forward
            rows.append(row[:, -1])
        return torch.stack(rows, dim=1)

    def _rollback(self, step: int) -> None:
        """Ban the pairs chosen at ``step`` in this pass; forget what came after."""
        self.bans.setdefault(step, set()).update(self.chosen.get(step, ()))
        for later in [k for k in self.bans if k > step]:
            del self.bans[later]
        for later in [k for k in self.snapshots if k > step]:
            del self.snapshots[later]
        for later in [k for k in self.chosen if k >= step]:
            del self.chosen[later]
        self.policy.restore(step)

    def _replay(self, sequences: Tensor, step: int, prompt: int, kwargs: dict[str, Any], logits: Tensor) -> Tensor:
        """Crop the cache to the prompt and feed the restored prefixes again (one forward); returns the fresh
        logits of step ``step`` (the snapshot's when nothing is replayed)."""
        cache = kwargs["cache"]
        extra = int(cache.get_seq_length()) - prompt
        if extra > 0:
            cache.crop(-extra)
        if step == 0:
            return logits
        cut = {
            k: (v[..., : prompt + step] if k in ("attention_mask", "position_ids", "mm_token_type_ids") and isinstance(v, Tensor) else v)
            for k, v in kwargs.items()
        }
        fresh, _ = self._forward(sequences, step, cut)
        self.replays += 1
        self.replay_error = max(self.replay_error, float((fresh - logits).abs().max()))
        return fresh


class _CacheOnly(dict):
    """What ``_update_model_kwargs_for_generation`` reads from a model output: the cache."""

    def __init__(self, cache: Any) -> None:
        super().__init__(cache=cache)


def _candidate_index(candidates: Tensor, parents: Tensor, tokens: Tensor) -> Tensor:
    """For each new beam, the index of its token among its parent's candidates (0 when absent: a -inf beam)."""
    own = candidates.index_select(0, parents)  # [nb, C]
    match = own == tokens[:, None]
    return torch.where(match.any(dim=1), match.float().argmax(dim=1), torch.zeros_like(tokens)).long()


__all__ = ["ROWS", "SampleLoop", "beam_lookahead_loop", "head_max_rows", "install_beam_lookahead", "run_key"]
