"""OPERA: the checks of shared/specs/opera.md on the tiny zoo models.

The worked examples (window, column scores, scores, rollback rule); identity to stock beam search with the
penalty off, rollback off and C = V; tree == sequential look-ahead; a constructed attention column triggers a
rollback at the threshold and not one step earlier; a replayed cache gives the uninterrupted logits; batch ==
samples alone; typed refusals; ``remove()`` restores ``generate``; the private beam helpers it reuses exist.
"""

from __future__ import annotations

import pytest
import torch
from baselines_helpers import model_fingerprint, same_fingerprint
from conftest import NEW_FAMILIES
from helpers import batch_inputs, row_inputs
from transformers.generation.utils import GenerationMixin

import steer
from steer import edits, zoo
from steer.backends.transformers import beam_loop
from steer.errors import (
    DecodingModeError,
    IncompatibleMethodsError,
    InvalidParameterError,
    MissingImageTokensError,
    UnsupportedModelError,
)
from steer.methods.vlm.opera import (
    OperaPolicy,
    candidate_scores,
    column_scores,
    image_share,
    mode,
    penalty,
    rollback_position,
    window_matrix,
)

#: the new families OPERA runs on (Gemma 3's sliding-window caches are refused: see below)
OPERA_NEW_FAMILIES = tuple(f for f in NEW_FAMILIES if f != "gemma3")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


def beams(model, inputs, n: int = 8, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, num_beams=5, do_sample=False, **kw)


# ---- worked examples -----------------------------------------------------------------------------------


def test_worked_example_window_and_scores() -> None:
    g0 = torch.tensor([1.0, 0.4, 0.2, 0.4]) / 2
    g1 = torch.tensor([0.8, 0.2, 0.2, 0.6, 0.2]) / 2
    g2 = torch.tensor([0.8, 0.2, 0.2, 0.4, 0.2, 0.2]) / 2
    cand = torch.tensor([0.6, 0.4, 0.2, 0.4, 0.1, 0.1, 0.2]) / 2
    history = [g[None] for g in (g0, g1, g2)]
    window = window_matrix(history, cand[None, None], prompt_len=3)[0, 0]
    expected = torch.tensor([[0.2, 0, 0, 0], [0.3, 0.1, 0, 0], [0.2, 0.1, 0.1, 0], [0.2, 0.05, 0.05, 0.1]])
    assert torch.allclose(window, expected)
    assert float(image_share(cand[None], torch.tensor([False, True, False]))) == pytest.approx(0.2)
    scores = column_scores(window, 50.0)
    assert torch.allclose(scores, torch.tensor([0.0015001297, 6.2585e-6, 1.2517e-6, 4.7684e-7]), rtol=1e-4)
    phi, loc = penalty(window, 50.0)
    assert float(phi) == pytest.approx(0.0015001297, rel=1e-6) and int(loc) == 0
    for n, value in ((6, 409.5), (7, 16384.0), (8, float("inf"))):
        assert float(column_scores(torch.full((n, n), 40.0 / 50).tril(), 50.0)[0]) == value
    assert int(penalty(torch.zeros(3, 3), 50.0)[1]) == 0  # all zero -> location 0
    windowed = window_matrix(history, cand[None, None], prompt_len=3, window=2)[0, 0]
    assert torch.allclose(windowed, torch.tensor([[0.1, 0.0], [0.05, 0.1]]))


def test_worked_example_candidate_scores() -> None:
    z = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0, 0.0])
    candidates = z.topk(2).indices
    assert candidates.tolist() == [3, 0]
    y = candidate_scores(z[candidates], torch.tensor([0.8, 0.1]), torch.zeros(2), 1.0, step=20, early_steps=10)
    assert torch.allclose(y, torch.tensor([2.2, 1.9]))
    full = torch.full_like(z, float("-inf")).scatter(0, candidates, y)
    log_probs = torch.log_softmax(full, -1)
    assert torch.allclose(log_probs[candidates], torch.tensor([-0.554355, -0.854355]), atol=1e-6)
    assert torch.isinf(log_probs[[1, 2, 4, 5]]).all()  # steer: -inf (the code: -1001.754)
    bonus = candidate_scores(z[candidates], torch.zeros(2), torch.tensor([0.6, 0.3]), 1.0, step=3, early_steps=10)
    assert torch.allclose(torch.log_softmax(bonus, -1), torch.tensor([-0.241008, -1.541008]), atol=1e-6)
    inf = candidate_scores(z[candidates], torch.tensor([float("inf"), 0.1]), torch.zeros(2), 1.0, 20, 10)
    assert torch.isinf(inf[0]) and inf[0] < 0


def test_worked_example_rollback_rule() -> None:
    assert mode(torch.tensor([12, 12])) == 12 and mode(torch.tensor([12, 7, 12, 7, 3])) == 7
    h = [[0, 0, 12, 12, 12, 12], [0, 12, 12, 0, 12, 12]]
    spent: dict[int, int] = {}
    assert rollback_position(h, 12, 3, 10, spent, 2) == 13 and spent == {13: 1}
    spent = {13: 2}
    assert rollback_position(h, 12, 3, 10, spent, 2) == 12 and spent[12] == 1
    assert rollback_position(h, 12, 3, 10, {13: 2, 12: 2}, 2) is None  # both exhausted
    assert rollback_position([[7] * 6, [7] * 6], 7, 3, 10, {}, 2) is None  # L = 7 < 10 never fires
    assert rollback_position([[12] * 3, [12] * 5], 12, 3, 10, {}, 2) is None  # exactly 3 hits: no


# ---- identity with stock beam search ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "lookahead"),
    [(f, "tree") for f in ("llava", "qwen2_vl", *OPERA_NEW_FAMILIES)] + [(f, "sequential") for f in ("llava", "qwen2_vl")],
)
def test_penalty_off_rollback_off_equals_plain_beam_search(family: str, lookahead: str) -> None:
    model, processor = zoo.load_tiny(family)
    vocab = model.config.text_config.vocab_size
    for inputs in (row_inputs(processor, family, 0), batch_inputs(processor, family, n=3)):
        base = beams(model, inputs)
        settings = {"penalty_weights": 0.0, "threshold": None, "num_attn_candidates": vocab, "lookahead": lookahead}
        with steer.apply(model, "opera", **settings):
            out = beams(model, inputs)
            scored = beams(model, inputs, return_dict_in_generate=True)
        with torch.no_grad():
            stock = model.generate(
                **inputs, max_new_tokens=8, min_new_tokens=8, num_beams=5, return_dict_in_generate=True, output_scores=True
            )
        assert torch.equal(out, base)
        assert torch.equal(scored.sequences, base)
        assert torch.allclose(scored.sequences_scores, stock.sequences_scores, atol=1e-5)


def test_tree_equals_sequential_lookahead(monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    rows: dict[str, list[torch.Tensor]] = {"tree": [], "sequential": []}
    real = OperaPolicy.scores
    current = {"mode": "tree"}

    def record(self, view):
        if view.rows is not None:
            rows[current["mode"]].append(view.rows.clone())
        return real(self, view)

    monkeypatch.setattr(OperaPolicy, "scores", record)
    outs = {}
    for look in ("tree", "sequential"):
        current["mode"] = look
        with steer.apply(model, "opera", lookahead=look, penalty_weights=5.0, early_steps=2):
            outs[look] = beams(model, inputs)
    assert torch.equal(outs["tree"], outs["sequential"])
    assert len(rows["tree"]) == len(rows["sequential"]) > 0
    for a, b in zip(rows["tree"], rows["sequential"]):
        assert (a - b).abs().max() < 1e-5


# ---- rollback ------------------------------------------------------------------------------------------


def column_at(prompt_len: int, location: int, layer: int = 3) -> edits.AttentionMask:
    """Every query after generated token ``location`` attends (almost only) to it: a constructed column (from the
    forward whose cache holds that token on, so tree and sequential look-ahead see the same pattern)."""

    def bias(e: edits.EditContext) -> torch.Tensor | None:
        k, q = e.key_len, e.query_len
        if k is None or q is None or e.forward.past_length <= prompt_len + location:
            return None
        out = torch.zeros(1, 1, q, k)
        out[..., prompt_len + location] = 30.0
        return out

    return edits.AttentionMask(layers=[layer], mask=bias, mode="add")


@pytest.mark.parametrize("lookahead", ["tree", "sequential"])
def test_constructed_column_triggers_rollback_at_the_threshold(lookahead: str) -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 0)
    prompt, location = inputs["input_ids"].shape[1], 3
    fired = {}
    for r in (2, 3):
        with steer.apply(model, column_at(prompt, location)):
            settings = {"threshold": r, "min_rollback_pos": 2, "early_steps": 0, "max_rollbacks": 1, "lookahead": lookahead}
            with steer.apply(model, "opera", **settings) as handle:
                out = beams(model, inputs, n=10)
                sample = handle.state["opera"]["samples"][0]
        first = sample["rollbacks"][0]
        # the column starts with token location + 1 (the first token after the summary token): r + 1 hits at
        # step location + 1 + r, and the rollback fires there, not one step earlier
        assert first == {"step": location + 1 + r, "to": location + 1, "location": location, "hits": r + 1}
        assert sample["rollbacks"][1]["to"] == location  # rollbacks[L + 1] spent (beta 1): p = L
        fired[r] = first["step"]
        assert out.shape[1] == prompt + 10
    assert fired[3] == fired[2] + 1
    with steer.apply(model, column_at(prompt, location)):
        with steer.apply(model, "opera", threshold=None, min_rollback_pos=2, early_steps=0) as handle:
            beams(model, inputs, n=10)
            assert handle.state["opera"]["samples"][0]["rollbacks"] == []


def test_replayed_cache_gives_uninterrupted_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = row_inputs(processor, "qwen2_vl", 0)
    loops: list[beam_loop.SampleLoop] = []
    real = beam_loop.SampleLoop.run

    def run(self):
        loops.append(self)
        return real(self)

    monkeypatch.setattr(beam_loop.SampleLoop, "run", run)
    prompt = inputs["input_ids"].shape[1]
    with steer.apply(model, column_at(prompt, 2)):
        with steer.apply(model, "opera", threshold=2, min_rollback_pos=2, early_steps=0) as handle:
            beams(model, inputs, n=9)
            assert handle.state["opera"]["samples"][0]["rollbacks"]
    assert loops[0].replays > 0 and loops[0].replay_error < 1e-5


def test_batch_equals_samples_alone_and_official_batch_option() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=3)
    with steer.apply(model, "opera", penalty_weights=3.0, early_steps=2):
        together = beams(model, inputs)
        alone = [beams(model, row_inputs(processor, "llava", i)) for i in range(3)]
    width = inputs["input_ids"].shape[1]
    for i in range(3):
        assert torch.equal(together[i, width:], alone[i][0, -8:])
    # rollback with batch > 1 (the fix) vs the official code's silent skip
    two = batch_inputs(processor, "llava", n=2)
    prompt = two["input_ids"].shape[1]
    for flag, expect in ((True, True), (False, False)):
        with steer.apply(model, column_at(prompt, 3)):
            with steer.apply(model, "opera", threshold=2, min_rollback_pos=2, early_steps=0, rollback_in_batch=flag) as h:
                beams(model, two, n=9)
                assert any(s["rollbacks"] for s in h.state["opera"]["samples"]) is expect


def test_one_candidate_runs() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 1)
    with steer.apply(model, "opera", num_attn_candidates=1):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, num_beams=5, return_dict_in_generate=True)
    assert torch.isfinite(out.sequences_scores).all()


# ---- refusals, remove, private API ---------------------------------------------------------------------------


def test_refusals() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 0)
    with steer.apply(model, "opera"):
        for kw, match in (
            ({"num_beams": 1}, "num_beams >= 2"),
            ({"num_beams": 3, "do_sample": True}, "do_sample=False"),
            ({"num_beams": 3, "output_scores": True, "return_dict_in_generate": True}, "output_scores"),
        ):
            with pytest.raises(DecodingModeError, match=match), torch.no_grad():
                model.generate(**inputs, max_new_tokens=2, **kw)
        with pytest.raises(DecodingModeError, match="streamer"), torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, num_beams=3, streamer=object())
        text = zoo.make_inputs(processor, "llava", ["USER: hello there ASSISTANT:"])
        with pytest.raises(MissingImageTokensError), torch.no_grad():
            model.generate(**text, max_new_tokens=2, num_beams=3)
    for bad in ({"threshold": 0}, {"num_attn_candidates": 0}, {"layer": 9}, {"lookahead": "wide"}, {"window": 1}):
        with pytest.raises(InvalidParameterError):
            steer.apply(model, "opera", **bad)
    with pytest.raises(IncompatibleMethodsError, match="auxiliary branch"):
        steer.apply(model, ["vcd", "opera"])


def test_sliding_window_model_refused_at_apply() -> None:
    """Gemma 3's sliding-window caches cannot be cut back: OPERA refuses at apply and says what would work."""
    model, _ = zoo.load_tiny("gemma3")
    with pytest.raises(UnsupportedModelError, match="sliding-window layers.*plain beam search"):
        steer.apply(model, "opera")
    assert "generate" not in model.__dict__


def test_remove_restores_generate_bit_exactly() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 0)
    base = beams(model, inputs)
    before = model_fingerprint(model)
    handle = steer.apply(model, "opera")
    assert "generate" in model.__dict__
    beams(model, inputs)
    handle.remove()
    assert "generate" not in model.__dict__ and "_prepare_generation_config" not in model.__dict__
    assert torch.equal(beams(model, inputs), base)
    assert same_fingerprint(before, model_fingerprint(model))


def test_private_beam_helpers_exist() -> None:
    for name in beam_loop._BEAM_HELPERS:
        assert hasattr(GenerationMixin, name), name


def test_recipes_hold_the_official_settings() -> None:
    model, _ = zoo.load_tiny("llava")
    with steer.apply(model, steer.recipe("llava-1.5/opera")) as handle:
        p = handle.params["opera"]
        assert (p["scale_factor"], p["threshold"], p["num_attn_candidates"], p["penalty_weights"]) == (50.0, 15, 5, 1.0)
        assert handle.state["opera"]["max_rollbacks"] == 5  # beta = C, as the code
    efficient = steer.recipe("llava-1.5/opera-efficient").methods["opera"]
    assert efficient["threshold"] == 25 and efficient["num_attn_candidates"] == 1
    for family in ("llava-next", "qwen2-vl", "qwen2.5-vl"):
        assert steer.recipe(f"{family}/opera").methods["opera"]["threshold"] == 15
