"""VHR (Vision-aware Head Reinforcement): the checks of shared/specs/vhr.md on the tiny zoo models.

The selection rule is tested on the spec's worked example; the whole method against an independent eager
reference (per-head outputs captured at o_proj, layer by layer, both branches), against per-sample runs,
beams, and the bit-identity guarantees.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import FAMILIES
from helpers import QUESTIONS, batch_inputs, generate, logits, real, row_inputs

import steer
from steer import zoo
from steer.adapters import adapter_for
from steer.adapters.base import strip_tokens as strip_image_tokens
from steer.backends.transformers.installers import source_run
from steer.backends.transformers.runtime import Runtime
from steer.methods.vlm import vhr
from steer.methods.vlm.vhr import VHR, auto_layers, head_divergence, reinforce, select_heads

WORKED_VHD = torch.tensor([0.9, 0.2, 3.5, 0.4, 1.1, 0.3, 0.8, 0.6])
WORKED_TA = torch.tensor([1.0, 1.2, 9.0, 0.9, 1.1, 1.0, 1.3, 0.8])


def heads_of(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


# ---- the selection rule (Eqs. 4, 6, 7) ---------------------------------------------------------------


@pytest.mark.parametrize("std", ["unbiased", "population"])
def test_worked_example_with_filter(std: str) -> None:
    sel = select_heads(WORKED_VHD, WORKED_TA, filter_outliers=True, std=std)
    assert heads_of(sel.outliers) == [2]
    assert torch.allclose(sel.vhd, torch.tensor([0.9, 0.2, 0.0, 0.4, 1.1, 0.3, 0.8, 0.6]))
    assert heads_of(sel.mask) == [0, 4, 6, 7]


def test_worked_example_without_filter() -> None:
    sel = select_heads(WORKED_VHD, WORKED_TA, filter_outliers=False)
    assert heads_of(sel.outliers) == []
    assert torch.equal(sel.vhd, WORKED_VHD)
    assert heads_of(sel.mask) == [0, 2, 4, 6]
    # batched rows select independently
    both = select_heads(
        torch.stack([WORKED_VHD, WORKED_VHD.flip(0)]), torch.stack([WORKED_TA, WORKED_TA.flip(0)])
    )
    assert heads_of(both.mask[0]) == [0, 4, 6, 7] and heads_of(both.mask[1]) == [0, 1, 3, 7]


def test_half_the_heads_and_outliers_never_selected() -> None:
    g = torch.Generator().manual_seed(0)
    vhd = torch.rand(200, 32, generator=g) ** 3 * 5  # skewed, distinct values
    ta = torch.rand(200, 32, generator=g) ** 3 * 5
    ta[:, :3] += 10.0  # some heads with a large norm: outlier candidates
    vhd[:, :3] += 3.0
    for filt in (False, True):
        sel = select_heads(vhd, ta, filter_outliers=filt)
        assert (sel.mask.sum(-1) == 16).all()
        assert not (sel.mask & sel.outliers).any()
    assert select_heads(vhd, ta).outliers.any()
    a, n = torch.randn(2, 32, 8, generator=g), torch.randn(2, 32, 8, generator=g)
    d, t = head_divergence(a, n)
    assert torch.allclose(d[1, 5], (a[1, 5] - n[1, 5]).norm()) and torch.allclose(t[0, 3], n[0, 3] @ n[0, 3])


def test_auto_layers_rule() -> None:
    assert auto_layers(32) == [1, *range(18, 32)]
    assert auto_layers(28) == [1, *range(16, 28)]
    assert auto_layers(36) == [1, *range(20, 36)]
    assert auto_layers(40) == [1, *range(22, 40)]
    assert auto_layers(4) == [1, 2, 3]


def test_proposition_1_reinforcing_a_head_turns_the_output_towards_it() -> None:
    """cos(x + (alpha-1) y, y) > cos(x, y) for alpha > 1 unless x is parallel to y."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    y = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    alpha = 1.0 + 4 * torch.rand(2000, 1, generator=g, dtype=torch.float64) + 1e-3
    cos = torch.nn.functional.cosine_similarity
    assert (cos(x + (alpha - 1) * y, y) > cos(x, y)).all()
    parallel = 2.5 * y  # the exception: x parallel to y keeps cos = 1
    assert torch.allclose(cos(parallel + (alpha - 1) * y, y), cos(parallel, y))


# ---- check 4: scaling the pre-o_proj slice == adding (alpha-1) A_i W_i^T --------------------------------


def test_reinforce_equals_adding_head_through_o_proj() -> None:
    model, _ = zoo.load_tiny("qwen2_vl")
    adapter = adapter_for(model)
    o_proj, h, d = adapter.attention(2).o_proj, adapter.num_heads, adapter.head_dim
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        o_proj.weight.copy_(torch.randn(o_proj.weight.shape, generator=g))
        heads = torch.randn(3, 7, h, d, generator=g)
        mask = torch.tensor([[True, False, True, False], [False, False, False, True], [False] * 4])
        alpha = 2.0
        got = o_proj(reinforce(heads, mask, alpha).reshape(3, 7, h * d))
        expected = o_proj(heads.reshape(3, 7, h * d))
        for b in range(3):
            for i in heads_of(mask[b]):
                expected[b] += (alpha - 1) * heads[b, :, i] @ o_proj.weight[:, i * d : (i + 1) * d].T
    assert (got - expected).abs().max() < 1e-5
    assert torch.equal(reinforce(heads, mask, alpha)[2], heads[2])  # unselected heads stay bit-identical


# ---- the no-image branch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_no_image_rows_are_the_prompt_without_image_tokens(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    adapter = adapter_for(model)
    inputs = batch_inputs(processor, family)
    ids, mask = strip_image_tokens(
        inputs["input_ids"], inputs["attention_mask"], adapter.image_related_token_ids
    )
    placeholder = zoo.inputs.IMAGE_PLACEHOLDER[family]
    for i in range(3):
        prompt = zoo.chat_prompt(family, QUESTIONS[i % len(QUESTIONS)])
        if family.startswith("qwen"):  # <|vision_start|><|image_pad|><|vision_end|> goes as a whole
            text = prompt.replace("<|vision_start|>" + placeholder + "<|vision_end|>", "")
        else:  # only the placeholder goes: the "\n" after <image> stays
            text = prompt.replace(placeholder, "")
        expected = processor.tokenizer(text, return_tensors="pt")["input_ids"][0]
        row = ids[i][mask[i].bool()]
        assert torch.equal(row, expected), (i, row.tolist(), expected.tolist())
        assert mask[i, -1] == 1 and mask[i].tolist() == sorted(mask[i].tolist())  # left padded


# ---- the whole method against an eager reference ---------------------------------------------------------


def eager_reference(family: str, inputs, layers: list[int], alpha: float, lockstep: bool):
    """Independent VHR on an eager copy of the model, one target layer at a time.

    For layer l: run both branches with the heads chosen so far reinforced (the no-image branch only for
    lockstep), take the per-head o_proj inputs at the last position, apply Eqs. 4/6/7 written out here.
    The no-image branch is the model's own text-only call on the prompt without image tokens.
    """
    model, _ = zoo.load_tiny(family, attn_implementation="eager")
    adapter = adapter_for(model)
    h = adapter.num_heads
    ids = inputs["input_ids"][0]
    drop = torch.tensor(adapter.image_related_token_ids)
    text_inputs = {"input_ids": ids[~torch.isin(ids, drop)][None]}
    chosen: dict[int, torch.Tensor] = {}

    def run(kw, scaled: dict[int, torch.Tensor], capture: int | None = None):
        seen = {}

        def hook_for(layer):
            def hook(module, args):
                x = args[0].view(*args[0].shape[:-1], h, -1)
                if layer == capture:
                    seen["last"] = x[0, -1].clone()
                if layer in scaled:
                    x = x.clone()
                    x[:, :, scaled[layer]] *= alpha
                return (x.reshape(args[0].shape),)

            return hook

        hooks = [
            adapter.attention(layer).o_proj.register_forward_pre_hook(hook_for(layer)) for layer in layers
        ]
        try:
            with torch.no_grad():
                out = model(**kw).logits
        finally:
            for hk in hooks:
                hk.remove()
        return seen.get("last"), out

    vhds = {}
    for layer in layers:
        a, _ = run(inputs, chosen, capture=layer)
        n, _ = run(text_inputs, chosen if lockstep else {}, capture=layer)
        vhd = (a - n).norm(dim=-1)
        ta = (n * n).sum(-1)
        outlier = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
        vhd = torch.where(outlier, torch.zeros_like(vhd), vhd)
        chosen[layer] = vhd > vhd.sort().values[(h - 1) // 2]
        vhds[layer] = vhd
    _, final = run(inputs, chosen)
    return {layer: heads_of(m) for layer, m in chosen.items()}, vhds, final


@pytest.mark.parametrize(
    "family,branch",
    [("llava", "separate"), ("qwen2_5_vl", "separate"), ("llava_next", "lockstep"), ("qwen2_vl", "lockstep")],
)
def test_vhd_and_heads_match_eager_reference(family: str, branch: str) -> None:
    model, processor = zoo.load_tiny(family)  # sdpa
    inputs = row_inputs(processor, family, 1)
    alpha = 2.5
    with steer.apply(model, "vhr", alpha=alpha, branch=branch) as handle:
        steered = logits(model, inputs)
        state = handle.state["vhr"]
    heads, vhds, final = eager_reference(
        family, inputs, state["layers"], alpha, lockstep=branch == "lockstep"
    )
    assert state["heads"][0] == heads
    for layer, vhd in vhds.items():
        assert torch.allclose(torch.tensor(state["vhd"][0][layer]), vhd, atol=1e-5), layer
    assert (steered - final).abs().max() < 1e-4
    plain = logits(model, inputs)
    assert (steered - plain).abs().max() > 1e-2  # the reinforcement really acts


# ---- guarantees on the real models ------------------------------------------------------------------------


def count_text_model_calls(model) -> tuple[list[int], object]:
    calls: list[int] = []
    hook = adapter_for(model).text_model.register_forward_pre_hook(
        lambda m, a, k: calls.append(1), with_kwargs=True
    )
    return calls, hook


def test_alpha_one_is_bit_identical_and_runs_no_auxiliary_pass() -> None:
    model, processor = zoo.load_tiny("llava_next")
    inputs = batch_inputs(processor, "llava_next")
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    calls, hook = count_text_model_calls(model)
    with steer.apply(model, "vhr", alpha=1.0) as handle:
        assert handle.edits == [] and Runtime.of(model).attention_edits == {}
        assert torch.equal(logits(model, inputs), ref_logits)
        assert len(calls) == 1  # no auxiliary pass
        assert torch.equal(generate(model, inputs), ref_tokens)
    hook.remove()


@pytest.mark.parametrize("branch", ["separate", "lockstep"])
def test_identical_branches_select_nothing_and_change_nothing(
    branch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test hook: the 'no-image' branch is the image branch itself -> every VHD is 0, no head, same output."""

    monkeypatch.setitem(source_run.BUILDERS, "text_only", source_run.BUILDERS["same"])
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl")
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with steer.apply(model, "vhr", branch=branch) as handle:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)
        state = handle.state["vhr"]
    for row in range(3):
        assert all(v == [] for v in state["heads"][row].values())
        assert all(max(v) == 0.0 for v in state["vhd"][row].values())


def test_only_target_layers_change() -> None:
    model, processor = zoo.load_tiny("llava")
    adapter = adapter_for(model)
    inputs = batch_inputs(processor, "llava")
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(adapter.num_layers)}
    hooks = [
        adapter.attention(layer).o_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: seen[layer].append(a[0].clone())
        )
        for layer in range(adapter.num_layers)
    ]
    logits(model, inputs)
    plain = {layer: v[-1] for layer, v in seen.items()}
    with steer.apply(model, "vhr", layers=[2], alpha=3.0) as handle:
        assert set(Runtime.of(model).attention_edits) == {2}
        logits(model, inputs)  # the real pass runs after the auxiliary one: [-1] is the real pass
        state = handle.state["vhr"]
    for hk in hooks:
        hk.remove()
    steered = {layer: v[-1] for layer, v in seen.items()}
    assert list(state["heads"][0]) == [2]
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[1], plain[1])
    mask = torch.zeros(3, adapter.num_heads, dtype=torch.bool)
    for row in range(3):
        mask[row, state["heads"][row][2]] = True
    shape = (*plain[2].shape[:-1], adapter.num_heads, adapter.head_dim)
    expected = reinforce(plain[2].view(shape), mask, 3.0).reshape(plain[2].shape)
    assert torch.equal(steered[2], expected) and not torch.equal(steered[2], plain[2])
    assert not torch.equal(steered[3], plain[3])  # later layers see the reinforced state
    # the auxiliary pass does not leak into transformers' output capturing
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
        with steer.apply(model, "vhr", layers=[2], alpha=3.0):
            got = model(**inputs, output_hidden_states=True).hidden_states
    assert len(got) == len(ref) and all(torch.equal(got[i], ref[i]) for i in range(3))
    assert not torch.equal(got[3], ref[3])


def test_heads_fixed_across_decode_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    original_at_heads, original_select = VHR._at_heads, vhr.select_heads
    log: list[tuple[str, int, int, torch.Tensor]] = []
    selections: list[int] = []

    def spy_at_heads(self, out, ectx):
        new = original_at_heads(self, out, ectx)
        changed = (
            (new - out).abs().amax(dim=(1, 3)) > 0
            if new is not None
            else torch.zeros(out.shape[0], out.shape[2])
        )
        log.append((ectx.phase, ectx.layer, out.shape[1], changed.bool()))
        return new

    def spy_select(*args, **kwargs):
        selections.append(1)
        return original_select(*args, **kwargs)

    monkeypatch.setattr(VHR, "_at_heads", spy_at_heads)
    monkeypatch.setattr(vhr, "select_heads", spy_select)
    model, processor = zoo.load_tiny("llava_next")
    inputs = batch_inputs(processor, "llava_next", n=2)
    calls, hook = count_text_model_calls(model)
    new_tokens = 5
    with steer.apply(model, "vhr") as handle:
        generate(model, inputs, max_new_tokens=new_tokens)
        state = handle.state["vhr"]
    hook.remove()
    layers = state["layers"]
    assert len(selections) == len(layers)  # one selection per layer, at the prefill only
    assert len(calls) == 1 + new_tokens  # one auxiliary pass + prefill + decode steps
    for layer in layers:
        steps = [(phase, q, m) for phase, lay, q, m in log if lay == layer]
        assert [p for p, _, _ in steps] == ["prefill"] + ["decode"] * (new_tokens - 1)
        assert steps[0][1] == inputs["input_ids"].shape[1] and all(q == 1 for _, q, _ in steps[1:])
        for row in range(2):
            assert heads_of(steps[0][2][row]) == state["heads"][row][layer]
            assert len(state["heads"][row][layer]) == 2  # 4 heads: strictly above the lower median
            for _, _, m in steps[1:]:
                assert torch.equal(m[row], steps[0][2][row])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_with_left_padding_equals_per_sample_runs(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3
    with steer.apply(model, "vhr") as handle:
        batch = generate(model, inputs, max_new_tokens=6)
        batch_heads = handle.state["vhr"]["heads"]
        for i in range(3):
            alone = generate(model, row_inputs(processor, family, i), max_new_tokens=6)
            assert torch.equal(batch[i], alone[0]), f"row {i}"
            assert handle.state["vhr"]["heads"][0] == batch_heads[i], f"row {i}"


def test_beams_run_and_select_per_row() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl", n=2)
    with steer.apply(model, "vhr") as handle:
        generate(model, inputs, max_new_tokens=3)
        greedy_heads = handle.state["vhr"]["heads"]
        out = generate(model, inputs, num_beams=3, max_new_tokens=3)
        beam_heads = handle.state["vhr"]["heads"]
    assert out.shape == (2, 3)
    assert len(beam_heads) == 6  # HF expands the beams before the prefill: one row per beam
    for row in range(6):
        assert beam_heads[row] == greedy_heads[row // 3]


@pytest.mark.parametrize("branch", ["separate", "lockstep"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_on_sdpa_without_eager_or_output_attentions(
    family: str, branch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, processor = zoo.load_tiny(family)
    adapter = adapter_for(model)
    inputs = batch_inputs(processor, family, n=2)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs, max_new_tokens=4)

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention was called")

    modeling = sys.modules[type(adapter.attention(0)).__module__]
    monkeypatch.setattr(modeling, "eager_attention_forward", no_eager)
    flags: list[object] = []
    hook = adapter.text_model.register_forward_pre_hook(
        lambda m, a, k: flags.append(k.get("output_attentions")), with_kwargs=True
    )
    with steer.apply(model, "vhr", branch=branch) as handle:
        assert model.config.text_config._attn_implementation == "steer"
        out = logits(model, inputs)
        tokens = generate(model, inputs, max_new_tokens=4)
        state = handle.state["vhr"]
    hook.remove()
    assert (
        not any(flags)
        and not model.config.output_attentions
        and not model.config.text_config.output_attentions
    )
    assert model.config.text_config._attn_implementation == "sdpa"
    assert (out - ref_logits)[real(inputs)].abs().max() > 1e-2
    assert tokens.shape == ref_tokens.shape
    assert state["layers"] == [1, 2, 3] and state["branch"] == branch
    for row in range(2):
        assert sorted(state["heads"][row]) == [1, 2, 3]
        for layer in (1, 2, 3):
            vhd = state["vhd"][row][layer]
            assert len(vhd) == adapter.num_heads and len(state["heads"][row][layer]) == 2
            assert all(vhd[i] == 0.0 for i in state["outliers"][row][layer])
            assert not set(state["outliers"][row][layer]) & set(state["heads"][row][layer])


def test_lockstep_and_separate_agree_on_the_first_target_layer() -> None:
    """Below the first target layer nothing is reinforced, so both branch modes see the same states there."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    chosen = {}
    for branch in ("separate", "lockstep"):
        with steer.apply(model, "vhr", branch=branch) as handle:
            logits(model, inputs)
            chosen[branch] = handle.state["vhr"]
    for row in range(3):
        assert chosen["separate"]["heads"][row][1] == chosen["lockstep"]["heads"][row][1]
        assert torch.allclose(
            torch.tensor(chosen["separate"]["vhd"][row][1]),
            torch.tensor(chosen["lockstep"]["vhd"][row][1]),
            atol=1e-5,
        )


# ---- parameters, errors, recipes --------------------------------------------------------------------------


def test_parameters_and_errors() -> None:
    listing = {m["name"]: m for m in steer.methods()}["vhr"]
    defaults = {p["name"]: p["default"] for p in listing["params"]}
    assert defaults == {
        "alpha": 2.0,
        "layers": "auto",
        "filter_outliers": True,
        "std": "unbiased",
        "branch": "separate",
    }
    assert listing["needs_image_tokens"] is True
    model, processor = zoo.load_tiny("llava")
    for bad in (
        {"alpha": 0.0},
        {"alpha": 11.0},
        {"layers": [4]},
        {"layers": "all"},
        {"branch": "both"},
        {"std": "x"},
    ):
        with pytest.raises(steer.InvalidParameterError):
            steer.apply(model, "vhr", **bad)
    assert Runtime.of(model) is None
    with steer.apply(model, "vhr", layers=[3, 1], filter_outliers=False, std="population") as handle:
        logits(model, batch_inputs(processor, "llava"))
        assert handle.state["vhr"]["layers"] == [1, 3]
        assert all(o == {1: [], 3: []} for o in handle.state["vhr"]["outliers"])
    text_only = zoo.make_inputs(processor, "llava", [zoo.chat_prompt("llava", "Hello?", n_images=0)])
    with steer.apply(model, "vhr"), pytest.raises(steer.MissingImageTokensError, match="vhr"):
        generate(model, text_only)


@pytest.mark.parametrize(
    "family,recipe",
    [
        ("llava", "llava-1.5"),
        ("llava_next", "llava-next"),
        ("qwen2_vl", "qwen2-vl"),
        ("qwen2_5_vl", "qwen2.5-vl"),
    ],
)
def test_recipes(family: str, recipe: str) -> None:
    r = steer.recipe(f"{recipe}/vhr")
    assert r.methods["vhr"]["alpha"] == 2.0 and r.methods["vhr"]["layers"] == "auto"
    model, processor = zoo.load_tiny(family)
    with steer.apply(model, r) as handle:
        assert handle.params["vhr"]["alpha"] == 2.0
        logits(model, row_inputs(processor, family, 0))
        assert handle.state["vhr"]["layers"] == [1, 2, 3]


def test_strip_image_tokens_per_row_left_repadded() -> None:
    ids = torch.tensor([[0, 0, 5, 9, 9, 6, 7], [1, 9, 2, 3, 9, 4, 8], [0, 0, 0, 0, 0, 9, 3]])
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 1, 1]])
    out, mask = strip_image_tokens(ids, padding, (9,), pad_id=-1)
    assert out.tolist() == [[-1, -1, 5, 6, 7], [1, 2, 3, 4, 8], [-1, -1, -1, -1, 3]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1] * 5, [0, 0, 0, 0, 1]]
    out, mask = strip_image_tokens(ids, padding, (9,), length=6, pad_id=-1)
    assert out[1].tolist() == [-1, 1, 2, 3, 4, 8] and mask.sum().item() == 9
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] hold nothing but image tokens"):
        strip_image_tokens(ids, padding, (9, 3))
