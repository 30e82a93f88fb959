"""Tests for steer.zoo.synthscenes: determinism, co-occurrence statistics, captions, CHAIR/POPE helpers."""

from __future__ import annotations

import numpy as np
import pytest

from steer.evals.chair import caption_mentions, parse_synonyms
from steer.zoo import synthscenes as S


@pytest.fixture(scope="module")
def scenes() -> list[S.Scene]:
    return S.sample_scenes(seed=0, n=2000)


def test_vocabulary_and_table():
    assert len(S.KINDS) == 20 == len(set(S.KINDS))
    assert set(S.PARTNERS) | set(S.PAIRS) <= set(S.KINDS)
    for trigger, (partner, p) in S.PAIRS.items():
        assert f"{trigger:<9}  {partner:<9}  {p:.2f}" in S.__doc__


def test_determinism(scenes):
    assert S.sample_scenes(0, 2000) == scenes
    assert S.sample_scenes(0, 10) == scenes[:10]
    assert S.sample_scenes(1, 10) != scenes[:10]
    a, b = S.generate(3, 3), S.generate(3, 3)
    for (ia, sa), (ib, sb) in zip(a, b):
        assert sa == sb and np.array_equal(np.asarray(ia), np.asarray(ib))


def test_object_counts(scenes):
    n = [len(s.objects) for s in scenes]
    assert min(n) >= 1 and max(n) <= 1 + S.MAX_PRIMARIES + len(S.PAIRS)
    for s in scenes:
        assert len(s.kinds) == len(s.objects)  # one object per kind
        assert len({o.cell for o in s.objects}) == len(s.objects)
        assert all(0 <= o.cx <= 1 and 0 <= o.cy <= 1 for o in s.objects)
    assert {k for s in scenes for k in s.kinds} == set(S.KINDS)


def test_cooccurrence_frequencies(scenes):
    for trigger, (partner, p) in S.PAIRS.items():
        with_t = [s for s in scenes if trigger in s.kinds]
        without = [s for s in scenes if trigger not in s.kinds]
        assert len(with_t) > 150
        rate = np.mean([partner in s.kinds for s in with_t])
        base = np.mean([partner in s.kinds for s in without])
        # within 4 standard errors of the sampling rate (the base rate loses a little to the 4-object cap)
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / len(with_t)), (trigger, rate)
        q = S.PARTNER_BASE_RATE
        assert -0.02 - 4 * np.sqrt(q * (1 - q) / len(without)) < base - q < 0.01, (partner, base)


def test_captions_name_exactly_the_objects(scenes):
    vocab = parse_synonyms(S.synonyms_text())
    assert set(vocab.nodes) == set(S.KINDS)
    allowed = set(S.caption_vocabulary())
    for s in scenes[:300]:
        assert set(s.caption.split()) <= allowed
        words = s.caption.split()
        assert sorted(w for w in words if w in S.KINDS) == sorted(s.kinds)
        assert sorted(caption_mentions(s.caption, vocab).nodes) == sorted(s.kinds)


def test_pope_questions(scenes):
    sub = scenes[:400]
    splits = {name: S.pope_questions(sub, name, seed=0) for name in S.POPE_SPLITS}
    for qs in splits.values():
        assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
        assert [q["label"] for q in qs[:2]] == ["yes", "no"]
        for q in qs:
            kind = str(q["text"]).split()[3]
            present = kind in sub[int(str(q["image"])[6:12])].kinds
            assert present == (q["label"] == "yes")
    pos = [[q for q in qs if q["label"] == "yes"] for qs in splits.values()]
    assert pos[0] == pos[1] == pos[2]
    # adversarial: a lone trigger is asked about its absent partner
    hits = 0
    for i, s in enumerate(sub):
        for trigger, (partner, _) in S.PAIRS.items():
            if trigger in s.kinds and partner not in s.kinds and len(s.kinds) <= 3:
                asked = {
                    q["text"]
                    for q in splits["adversarial"]
                    if q["image"] == S.image_name(i) and q["label"] == "no"
                }
                assert f"Is there a {partner} in the image?" in asked
                hits += 1
    assert hits > 5
    with pytest.raises(ValueError):
        S.pope_questions(sub, "easy")


def test_render_size(scenes):
    for size in (64, 96):
        img = S.render(scenes[0], size)
        assert img.size == (size, size) and img.mode == "RGB"
    assert S.gt_objects(scenes[:2]) == {"0": sorted(scenes[0].kinds), "1": sorted(scenes[1].kinds)}
