"""Tests for steer-demo-llava: reproducible training, real save/load, generation and steering."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

import steer  # noqa: E402
from steer import zoo  # noqa: E402
from steer.zoo import demo_model, synthscenes, train_demo  # noqa: E402

SMALL = dict(batch_size=4, n_scenes=48, warmup=2, vision_steps=4, vision_batch_size=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = train_demo.TrainConfig(steps=100, seed=0, **SMALL)
    _, _, losses = train_demo.train(cfg, out=out)
    return out, losses


def test_same_seed_same_first_100_step_loss_curve(trained):
    """Issue 8 must-hold: same seed, same first-100-step loss curve (bit for bit); another seed differs."""
    out, losses = trained
    assert len(losses) == 100 and all(torch.isfinite(torch.tensor(losses)))
    log = json.loads((out / "train_log.json").read_text())
    assert log["loss"] == losses and len(log["vision_loss"]) == 4
    assert sum(losses[-10:]) < sum(losses[:10])  # it learns
    threads = torch.get_num_threads()
    _, _, again = train_demo.train(train_demo.TrainConfig(steps=100, seed=0, **SMALL))
    assert again == losses
    _, _, other = train_demo.train(train_demo.TrainConfig(steps=3, seed=1, **SMALL))
    assert other != losses[:3]
    assert torch.get_num_threads() == threads  # restored
    assert not torch.are_deterministic_algorithms_enabled()


def test_cli(tmp_path):
    train_demo.main(
        [
            "--steps",
            "2",
            "--seed",
            "0",
            "--batch-size",
            "2",
            "--n-scenes",
            "8",
            "--vision-steps",
            "1",
            "--vision-batch-size",
            "2",
            "--out",
            str(tmp_path),
        ]  # fmt: skip
    )
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert len(log["loss"]) == 2 and log["config"]["seed"] == 0
    assert (tmp_path / "model.safetensors").stat().st_size < 20 * 2**20


def test_saved_folder_loads_generates_and_steers(trained):
    out, _ = trained
    model, processor = zoo.load(out)
    assert isinstance(model, LlavaForConditionalGeneration)
    config = model.config
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.model_type == "llama"
    images = [image for image, _ in synthscenes.generate(5, 2)]
    inputs = demo_model.caption_inputs(processor, images)
    assert int((inputs["input_ids"] == config.image_token_index).sum()) == 2 * demo_model.IMAGE_TOKENS
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 5 or processor.tokenizer.eos_token_id in tokens
    text = processor.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(set(t.split()) <= set(demo_model.vocabulary()) for t in text)
    with steer.apply(model, "image_attention", scale=3.0):
        with torch.no_grad():
            steered = model(**inputs).logits[:, -1]
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert not torch.allclose(steered, ref)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits[:, -1], ref)


def test_tokenizer_roundtrip():
    tok = demo_model.build_tokenizer()
    scene = synthscenes.sample_scenes(0, 1)[0]
    ids = tok(scene.caption).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == scene.caption
    assert tok.unk_token_id not in tok("Is there a cup in the image?").input_ids


def test_batch_rows_are_captions_or_truthful_questions():
    processor = demo_model.build_processor()
    data = train_demo.SceneData(processor, seed=3, n_scenes=12)
    tok = processor.tokenizer
    draws = torch.rand(12, 3, generator=torch.Generator().manual_seed(0))
    batch = data.batch(list(range(12)), draws, qa_fraction=0.5)
    kinds_seen = {"caption": 0, "yes": 0, "no": 0}
    for r in range(12):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        target = tok.decode(labels[labels != -100])
        prompt = tok.decode(
            ids[(labels == -100) & (batch["attention_mask"][r] == 1)], skip_special_tokens=True
        )
        assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == demo_model.IMAGE_TOKENS
        if draws[r, 0] < 0.5:
            kind = prompt.split()[5]  # "user : is there a <kind> in the image ? ..."
            answer = "yes" if kind in data.scenes[r].kinds else "no"
            expected = f"{kind} yes </s>" if answer == "yes" else "no </s>"
            assert target == expected and "answer the question" in prompt
            kinds_seen[answer] += 1
        else:
            assert target == data.scenes[r].caption + " </s>" and "describe this image" in prompt
            kinds_seen["caption"] += 1
    assert all(kinds_seen.values()), kinds_seen


def test_no_questions_ask_about_the_absent_partner_at_the_given_share():
    """A no-question asks about the absent partner of a present trigger when ``which < partner_share``
    (POPE's adversarial case), otherwise about any absent kind; yes-questions are unaffected."""
    processor = demo_model.build_processor()
    data = train_demo.SceneData(processor, seed=0, n_scenes=300)
    tok = processor.tokenizer

    def asked(i: int, pick: float, which: float, share: float) -> tuple[str, str]:
        prompt, target = data.question(i, pick, which, share)
        return tok.decode(prompt, skip_special_tokens=True).split()[5], tok.decode(target)

    # a scene with a cup but no key, and no other trigger: the only adversarial kind is "key"
    lone = next(
        i for i, s in enumerate(data.scenes) if s.kinds & set(synthscenes.PAIRS) == {"cup"} and "key" not in s.kinds
    )
    assert asked(lone, 0.9, 0.3, 0.5) == ("key", "no </s>")
    assert asked(lone, 0.9, 0.49, 0.5) == ("key", "no </s>")
    # which >= share: uniform over the 20 - |kinds| absent kinds, which rescaled from [share, 1) to [0, 1)
    absent = [k for k in synthscenes.KINDS if k not in data.scenes[lone].kinds]
    assert asked(lone, 0.9, 0.75, 0.5) == (absent[int(0.5 * len(absent))], "no </s>")
    assert asked(lone, 0.9, 0.5, 0.5) == (absent[0], "no </s>")
    assert asked(lone, 0.9, 0.999, 0.5) == (absent[-1], "no </s>")
    assert asked(lone, 0.9, 0.3, 0.0) == (absent[int(0.3 * len(absent))], "no </s>")
    # yes-questions ignore the share
    present = [k for k in synthscenes.KINDS if k in data.scenes[lone].kinds]
    assert asked(lone, 0.1, 0.0, 1.0) == (present[0], f"{present[0]} yes </s>")
    # a scene whose triggers all have their partner falls back to the uniform draw
    paired = next(
        i
        for i, s in enumerate(data.scenes)
        if s.kinds & set(synthscenes.PAIRS)
        and all(synthscenes.PAIRS[t][0] in s.kinds for t in s.kinds & set(synthscenes.PAIRS))
    )
    absent = [k for k in synthscenes.KINDS if k not in data.scenes[paired].kinds]
    assert asked(paired, 0.9, 0.2, 1.0) == (absent[int(0.2 * len(absent))], "no </s>")
