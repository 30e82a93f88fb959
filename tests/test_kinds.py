"""The general edit kinds of the redesign against hand computations: Transform, Collect (positions, logit lens,
runs), SourceRun, Positions (1-D and M-RoPE, decode shift), PruneVisionTokens; typed artifacts between methods;
the coefficient-rule registry; typed refusals (a pipeline edit on a VLM, a layer or head that does not exist)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from helpers import batch_inputs, generate, logits

import steer
from steer import edits, zoo
from steer.adapters import adapter_for
from steer.api import check_artifacts
from steer.backends.transformers.runtime import Runtime
from steer.edits.artifacts import Artifact, PrunedLayout
from steer.kernels import dispatch
from steer.kernels.rules import RULES, CoefficientRule, register_rule
from steer.registry import Method


def layer_output(model: torch.nn.Module, inputs: Any, layer: int) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = adapter_for(model).decoder_layers[layer].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    logits(model, inputs)
    hook.remove()
    return seen[-1]


def test_transform_sites_equal_hand_hooks() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    adapter = adapter_for(model)

    def double(m: Any, a: Any, o: Any) -> Any:
        return o * 2.0

    hook = adapter.mlp(1).register_forward_hook(double)
    ref_mlp = logits(model, inputs)
    hook.remove()
    with steer.apply(model, edits.Transform(site="layer.mlp.out", layers=[1], fn=lambda x, e: x * 2.0)):
        assert torch.equal(logits(model, inputs), ref_mlp)

    hook = adapter.decoder_layers[2].register_forward_pre_hook(lambda m, a, kw: ((a[0] + 1.0, *a[1:]), kw) if a else (a, {**kw, "hidden_states": kw["hidden_states"] + 1.0}), with_kwargs=True)
    ref_in = logits(model, inputs)
    hook.remove()
    with steer.apply(model, edits.Transform(site="layer.in", layers=[2], fn=lambda x, e: x + 1.0)):
        assert torch.equal(logits(model, inputs), ref_in)
    with pytest.raises(ValueError, match="Transform.site"):
        edits.Transform(site="layer.attn.scores", layers=[0], fn=lambda x, e: x)


def test_collect_selects_positions_and_reads_the_logit_lens() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl")
    adapter = adapter_for(model)
    h1 = layer_output(model, inputs, 1)
    seen: dict[str, Any] = {}

    def read(x: torch.Tensor, e: edits.EditContext) -> None:
        seen.update(last=e.collected("last", 1), all=e.collected("all", 1), lens=e.collected("lens", 1), normed=e.collected("normed", 1))

    with steer.apply(
        model,
        [
            edits.Collect(name="last", site="layer.out", layers=[1], select="last"),
            edits.Collect(name="all", site="layer.out", layers=[1]),
            edits.Collect(name="lens", site="layer.logits", layers=[1], select="kept"),
            edits.Collect(name="normed", site="layer.logits.normed", layers=[1], select="kept"),
            edits.Transform(site="layer.out", layers=[3], fn=read),
        ],
    ):
        logits(model, inputs)
    real = inputs["attention_mask"].bool()
    last = (real.shape[1] - 1) - real.flip(1).long().argmax(1)
    assert torch.equal(seen["all"], h1)
    assert torch.equal(seen["last"], h1[torch.arange(3), last])
    with torch.no_grad():
        assert torch.allclose(seen["lens"], adapter.lm_head(h1), atol=1e-6)
        assert torch.allclose(seen["normed"], adapter.lm_head(adapter.final_norm(h1)), atol=1e-6)


def test_mask_modes_compose_with_the_models_mask() -> None:
    """``and`` / ``or`` act on the model's own mask: on a causal model, ``and(K)`` then ``or(O)`` equals
    ``replace((causal & padding & K) | O)`` built by hand; ``or`` alone lets later keys in (the output moves)."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    real = inputs["attention_mask"].bool()
    batch, length = real.shape
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    keep = (k % 3 != 1)[None, None].expand(batch, 1, length, length)  # hide every third key
    let_in = ((k - q).abs() <= 2)[None, None] & real[:, None, None, :] & real[:, None, :, None]  # two keys ahead
    causal = (k <= q)[None, None] & real[:, None, None, :]
    by_hand = (causal & keep) | let_in
    with steer.apply(model, [edits.AttentionMask(layers=[1, 2], mask=keep, mode="and"),
                             edits.AttentionMask(layers=[1, 2], mask=let_in, mode="or")]):  # fmt: skip
        composed = logits(model, inputs)
    with steer.apply(model, [edits.AttentionMask(layers=[1, 2], mask=by_hand, mode="replace")]):
        replaced = logits(model, inputs)
    assert torch.allclose(composed[real], replaced[real], atol=1e-6)
    with steer.apply(model, [edits.AttentionMask(layers=[1], mask=let_in, mode="or")]):
        ahead = logits(model, inputs)
    assert (ahead - logits(model, inputs))[real].abs().max() > 1e-4
    with pytest.raises(ValueError, match="'and', 'or', 'replace' or 'add'"):
        edits.AttentionMask(layers=[1], mask=keep, mode="xor")  # type: ignore[arg-type]


def test_source_run_same_inputs_reproduce_the_prefill_and_text_only_rows_are_the_adapters() -> None:
    """A "same" run without edits gives the layer states of the plain prefill; a "text_only" run feeds the
    adapter's text-only rows; an edit scoped to a run acts there only, never in the caller's forward."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    adapter = adapter_for(model)
    plain = logits(model, inputs)
    h2 = layer_output(model, inputs, 2)
    fed: list[dict[str, Any]] = []
    hook = adapter.text_model.register_forward_pre_hook(lambda m, a, kw: fed.append(dict(kw)), with_kwargs=True)
    got: dict[str, Any] = {}
    with steer.apply(
        model,
        [
            edits.SourceRun(name="again", inputs="same"),
            edits.SourceRun(name="text", inputs="text_only"),
            edits.Collect(name="again", site="layer.out", layers=[2], runs=("again",)),
            edits.Collect(name="text", site="layer.out", layers=[2], select="last", runs=("text",)),
            # acts only inside the "text" run: the caller's logits must not move
            edits.Transform(site="layer.out", layers=[0], fn=lambda x, e: x * 0.0, runs=("text",)),
            edits.Transform(site="layer.out", layers=[3], fn=lambda x, e: got.update(again=e.collected("again", 2), text=e.collected("text", 2))),
        ],
    ):
        assert torch.equal(logits(model, inputs), plain)
    hook.remove()
    assert torch.equal(got["again"], h2)
    # the caller's forward reaches this hook first; steer's pre-hook then runs the two auxiliary passes
    assert len(fed) == 3 and fed[0]["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1]
    text_rows = adapter.text_only_inputs(inputs["input_ids"], inputs["attention_mask"].bool())
    assert torch.equal(fed[2]["attention_mask"], text_rows["attention_mask"])
    assert torch.equal(fed[2]["inputs_embeds"], text_rows["inputs_embeds"])
    unscaled: dict[str, Any] = {}
    with steer.apply(
        model,
        [
            edits.SourceRun(name="text", inputs="text_only"),
            edits.Collect(name="text", site="layer.out", layers=[2], select="last", runs=("text",)),
            edits.Transform(site="layer.out", layers=[3], fn=lambda x, e: unscaled.update(text=e.collected("text", 2))),
        ],
    ):
        logits(model, inputs)
    assert not torch.allclose(got["text"], unscaled["text"])  # the run-scoped Transform acted inside its run


def test_positions_1d_decode_keeps_the_prompts_last_shift() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    seen: list[torch.Tensor] = []

    def shift(pos: torch.Tensor, e: edits.EditContext) -> torch.Tensor:
        assert e.image is not None and e.padding is not None
        return pos + 7 * (e.image.mask.long().cumsum(1) > 0).long()

    with steer.apply(model, edits.Positions(fn=shift)):  # the spy runs after steer's hook: it sees the new ids
        hook = adapter_for(model).text_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
        generate(model, inputs, max_new_tokens=3)
    hook.remove()
    real = inputs["attention_mask"]
    stock = (real.cumsum(1) - 1).clamp(min=0)
    image = inputs["input_ids"] == model.config.image_token_id
    expected = stock + 7 * (image.long().cumsum(1) > 0).long()
    assert torch.equal(seen[0][real.bool()], expected[real.bool()])
    for step, ids in enumerate(seen[1:], start=1):  # decode: the stock id + 7
        assert ids[:, 0].tolist() == (stock[:, -1] + step + 7).tolist()


def test_positions_mrope_recompute_rope_deltas() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl")
    owner = model.model
    stock, stock_deltas = owner.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    with steer.apply(model, edits.Positions(fn=lambda pos, e: pos + 4 * (e.image.mask.long().cumsum(1) > 0).long())):
        new, deltas = owner.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
        )
        steered = generate(model, inputs, max_new_tokens=3)
    assert torch.equal(deltas, stock_deltas + 4)  # the decoded tokens follow the shifted last token
    real = inputs["attention_mask"].bool()
    assert (new - stock)[:, real].max() == 4 and (new - stock)[:, real].min() == 0
    assert steered.shape == (3, 3)


def test_prune_vision_tokens_with_a_custom_rule_publishes_the_layout() -> None:
    """A raw PruneVisionTokens keeping the first k tokens of each image: the prompt shrinks, the layout says so,
    generate hands back the caller's prompt."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    layouts: list[PrunedLayout] = []
    edit = edits.PruneVisionTokens(keep=lambda scores, valid: torch.arange(3), on_pruned=layouts.append)
    with steer.apply(model, edit):
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        ids = Runtime.of(model).context.prompt_ids
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert (ids == model.config.image_token_id).sum(1).tolist() == [3, 3]
    assert [image.offsets.tolist() for row in layouts[0].images for image in row] == [[0, 1, 2], [0, 1, 2]]
    assert layouts[0].images[0][0].blocks[0].kept.tolist() == [0, 1, 2]


@dataclass
class _Secret(Artifact):
    value: int = 0
    invalidates: ClassVar[tuple[str, ...]] = ("image_grid",)


def _method(name: str, **attrs: Any) -> Method:
    cls = type(name, (Method,), {"name": name, **attrs})
    return cls(None, None, {})


def test_artifact_checks() -> None:
    provider = _method("maker", provides=(_Secret,))
    reader = _method("reader", consumes=(_Secret,), uses=("image_grid",))
    blind = _method("blind", uses=("image_grid",))
    needy = _method("needy", requires=(_Secret,))
    check_artifacts([provider, reader])
    check_artifacts([needy, provider])
    with pytest.raises(steer.IncompatibleMethodsError, match="needy needs _Secret"):
        check_artifacts([needy])
    with pytest.raises(steer.IncompatibleMethodsError, match="maker provides _Secret.*blind"):
        check_artifacts([provider, blind])
    with pytest.raises(steer.IncompatibleMethodsError, match="blind"):
        check_artifacts([blind], already=[provider])  # an earlier handle counts too


def test_registered_rule_runs_on_the_torch_paths() -> None:
    """A method's own rule (no kernel epilogue) drives GroupReweight on the fused and reference paths alike."""

    def double_images(rule: CoefficientRule, masses: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, rule.params["factor"]], device=masses.device)

    register_rule("test_factor", double_images)
    try:
        rule = CoefficientRule(kind="test_factor", params={"factor": 3.0}, groups=(1,))
        assert rule.epilogue is None and rule.num_groups == 1
        model, processor = zoo.load_tiny("llava")
        inputs = batch_inputs(processor, "llava")
        by_rule = edits.GroupReweight(layers=[2], coefficients=lambda m, e: rule.coefficients(m), rule=rule, renormalize=True)
        constant = edits.GroupReweight(layers=[2], coefficients=[1.0, 3.0], renormalize=True)
        with steer.apply(model, by_rule):
            fused = logits(model, inputs)
            with dispatch.forced_impl("reference"):
                ref = logits(model, inputs)
        with steer.apply(model, constant):
            expected = logits(model, inputs)
        real = inputs["attention_mask"].bool()
        assert torch.allclose(fused[real], expected[real], atol=1e-6)
        assert torch.allclose(ref[real], expected[real], atol=1e-5)
    finally:
        RULES.pop("test_factor")
    with pytest.raises(ValueError, match="kernel epilogue"):
        register_rule("bad", double_images, epilogue="nonsense")


def test_typed_refusals_at_apply() -> None:
    model, _ = zoo.load_tiny("llava")
    with pytest.raises(steer.InvalidParameterError, match="diffusers pipelines"):
        steer.apply(model, edits.ProcessorEdit(depths=[1], scores=lambda q, k, call: None))
    with pytest.raises(steer.InvalidParameterError, match="layer 9 is out of range.*valid: 0..3"):
        steer.apply(model, edits.Transform(site="layer.out", layers=[9], fn=lambda x, e: x))
    with pytest.raises(steer.InvalidParameterError, match=r"head\(s\) \[4\] do not exist; the model has 4 query heads"):
        steer.apply(model, edits.HeadScale(layers=[0], heads=[4], scale=2.0))
    with pytest.raises(steer.InvalidParameterError, match=r"shape \[H\] or \[B, H\] with H = 4.*got \[7\]"):
        steer.apply(model, edits.HeadScale(layers=[0], scale=torch.ones(7)))
    hidden = model.config.text_config.hidden_size
    with pytest.raises(steer.InvalidParameterError, match=rf"D = {hidden}.*got \[17\]"):
        steer.apply(model, edits.ResidualAdd(layers=[0], vector=torch.zeros(17)))
    with pytest.raises(steer.InvalidParameterError, match="no submodule 'model.nothing'.*top level: model, lm_head"):
        steer.apply(model, edits.ModuleHook(module="model.nothing", fn=lambda *a: None))
    with pytest.raises(steer.InvalidParameterError, match="no method 'nothing'"):
        steer.apply(model, edits.MethodWrap(module="model", name="nothing", fn=lambda *a: None))
    assert Runtime.of(model) is None
    # the same edits with fitting values are taken
    fitting = [
        edits.HeadScale(layers=[0], scale=torch.ones(2, 4)),
        edits.ResidualAdd(layers=[0], vector=torch.zeros(hidden)),
        edits.ModuleHook(module="model.language_model.layers.0", fn=lambda *a: None),
        edits.MethodWrap(module="model", name="get_image_features", fn=lambda o, a, k, e: o(*a, **k)),
    ]
    steer.apply(model, fitting).remove()


# ---- kinds of issue 16: ScoreEdit, Collect of logits and probabilities, following SourceRun, BeamLookahead ----


def _attention_inputs(model: Any, inputs: Any, layer: int) -> dict[str, torch.Tensor]:
    """Query/key/value of decoder layer ``layer`` in a plain (eager) forward, captured from its attention call."""
    seen: dict[str, torch.Tensor] = {}
    attn = adapter_for(model).attention(layer)
    modeling = __import__(type(attn).__module__, fromlist=["eager_attention_forward"])
    original = modeling.eager_attention_forward

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any) -> Any:
        if module is attn:
            seen.update(query=query, key=key, value=value, mask=mask, scaling=kw.get("scaling"))
        return original(module, query, key, value, mask, **kw)

    modeling.eager_attention_forward = capture
    try:
        model.config.text_config._attn_implementation = "eager"
        logits(model, inputs)
    finally:
        modeling.eager_attention_forward = original
        model.config.text_config._attn_implementation = "sdpa"
    return seen


def test_score_edit_and_probs_collect_equal_hand_computation() -> None:
    """ScoreEdit on the last real row of each sample: softmax of the edited score row times V, computed by hand from
    the layer's captured q/k/v; the probabilities collect equals the plain softmax of the same rows."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    layer = 2
    captured = _attention_inputs(model, inputs, layer)
    q, k, v, mask, scale = captured["query"], captured["key"], captured["value"], captured["mask"], captured["scaling"]
    groups = q.shape[1] // k.shape[1]  # GQA: each key/value head serves `groups` query heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    image = inputs["input_ids"] == model.config.image_token_id
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + mask.float()  # [B, H, T, T]
    last = scores[:, :, -1].clone()  # left padding: the last column is every row's last real token
    plain_probs = torch.softmax(scores, dim=-1)
    edited = torch.where(image[:, None, :], last * 3.0 - 1.0, last)
    hand = torch.matmul(torch.softmax(edited, dim=-1)[:, :, None], v.float())[:, :, 0]  # [B, H, D]
    got: dict[str, torch.Tensor] = {}

    def read_out(out: torch.Tensor, e: edits.EditContext) -> None:
        got["out"] = out[:, -1].clone()
        got["probs"] = e.collected("probs", layer)
        return None

    for impl in ("fused", "reference"):
        edit = edits.ScoreEdit(layers=[layer], fn=lambda s, e: s * 3.0 - 1.0, impl=impl)
        collect = edits.Collect(name="probs", site="layer.attn.probs", layers=[layer])
        with steer.apply(model, [collect, edit, edits.HeadOutputEdit(layers=[layer], fn=read_out)]):
            logits(model, inputs)
        assert (got["out"] - hand).abs().max() < 1e-5
        real = inputs["attention_mask"].bool()[:, None, :, None] & inputs["attention_mask"].bool()[:, None, None, :]
        assert (got["probs"] - plain_probs).masked_fill(~real, 0).abs().max() < 1e-6
    with pytest.raises(steer.MissingImageTokensError):
        with steer.apply(model, edits.ScoreEdit(layers=[1], fn=lambda s, e: s)):
            with torch.no_grad():
                model(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]), attention_mask=inputs["attention_mask"])


def test_following_source_run_logits_collect_and_batched_equals_sequential() -> None:
    """A branch on the caller's own inputs ('same') that follows decoding reproduces the caller's logits at every
    step (its own cache, its own lm_head call), batched and sequential alike; the caller's tokens are untouched."""
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl")
    base = generate(model, inputs, max_new_tokens=4)
    for batch in ("batched", "sequential"):
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def compare(f: torch.Tensor, e: edits.EditContext, pairs: list = pairs) -> None:
            pairs.append((f.clone(), e.collected("twin")))
            return None

        spec = [
            edits.SourceRun(name="twin", inputs="same", follow=True, batch=batch),
            edits.Collect(name="twin", site="logits", runs=("twin",)),
            edits.LogitsTransform(fn=compare),
        ]
        with steer.apply(model, spec):
            assert torch.equal(generate(model, inputs, max_new_tokens=4, num_beams=2), generate_plain_beams(model, inputs))
            pairs.clear()
            assert torch.equal(generate(model, inputs, max_new_tokens=4), base)
        assert len(pairs) == 4
        for main, twin in pairs:
            assert (main - twin).abs().max() < 1e-5
    with pytest.raises(ValueError, match="distort"):
        edits.SourceRun(name="x", inputs="distorted")
    with pytest.raises(ValueError, match="one kind of inputs"):
        edits.SourceRun(name="x", inputs=("same", "text_only"), follow=True)
    with pytest.raises(ValueError, match="batch"):
        edits.SourceRun(name="x", follow=True, batch="both")  # type: ignore[arg-type]


def generate_plain_beams(model: Any, inputs: Any) -> torch.Tensor:
    runtime = Runtime.of(model)
    assert runtime is not None
    with runtime.disabled():
        return generate(model, inputs, max_new_tokens=4, num_beams=2)


def test_beam_lookahead_default_policy_is_beam_search_over_the_candidates() -> None:
    """The base policy scores candidates by their logits: with C = V that is stock beam search, token for token."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    vocab = model.config.text_config.vocab_size
    base = generate(model, inputs, max_new_tokens=5, num_beams=3)
    edit = edits.BeamLookahead(policy=lambda batch: (lambda sample: edits.BeamPolicy()), candidates=vocab)
    with steer.apply(model, edit):
        assert torch.equal(generate(model, inputs, max_new_tokens=5, num_beams=3), base)
    with pytest.raises(ValueError, match="lookahead"):
        edits.BeamLookahead(policy=lambda b: (lambda s: edits.BeamPolicy()), lookahead="wide")  # type: ignore[arg-type]


@pytest.mark.parametrize("lq", [1, 5, 40])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_explicit_scores_fused_equals_reference_on_random_shapes(lq: int, heads: tuple[int, int]) -> None:
    """Both fused forms (one explicit row for few rows, LSE merge for many) against the materialised reference:
    GQA, padding and causal masks, key sets of two runs (two images), rows without keys."""
    from steer.kernels.lse import explicit_score_attention
    from steer.kernels.reference import eager_attention, explicit_score_reference

    g = torch.Generator().manual_seed(lq)
    hq, hkv = heads
    b, lk, d = 3, 48, 8
    q = torch.randn(b, hq, lq, d, generator=g)
    k, v = torch.randn(b, hkv, lk, d, generator=g), torch.randn(b, hkv, lk, d, generator=g)
    pad = torch.zeros(b, lk, dtype=torch.bool)
    for row, start in enumerate((0, 5, 11)):
        pad[row, start:] = True
    causal = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    mask = pad[:, None, None, :] & causal[None, None]
    keys = torch.zeros(b, lk, dtype=torch.bool)
    keys[:, 12:20] = True
    keys[:, 30:34] = True
    keys[2] = False  # a row without selected keys
    rows = torch.rand(b, lq, generator=g) > 0.4
    rows[0, -1] = True

    def fn(s: torch.Tensor) -> torch.Tensor:
        return s + 0.7 * s.abs() - 0.1 * s.mean(dim=-1, keepdim=True)  # not elementwise: sees the [B, H, R, K] block

    base, _ = eager_attention(q, k, v, mask, 0.35)
    fused = explicit_score_attention(q, k, v, mask, 0.35, rows, keys, fn, base)
    reference = explicit_score_reference(q, k, v, mask, 0.35, rows, keys, fn)
    assert (fused - reference).abs().max() < 1e-5
    lazy = explicit_score_attention(q, k, v, mask, 0.35, torch.ones_like(rows), keys, fn, lambda: 1 / 0)  # not called
    assert (lazy - explicit_score_reference(q, k, v, mask, 0.35, torch.ones_like(rows), keys, fn)).abs().max() < 1e-5
