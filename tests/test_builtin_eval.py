"""The built-in benchmark: `steer eval chair|pope --model builtin:demo`, the shipped demo model, its split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from steer.cli import app
from steer.evals import builtin, chair, pope
from steer.evals.chair import EvalInputError
from steer.zoo import demo_model, synthscenes

ENV = {"COLUMNS": "200"}
HAS_WEIGHTS = (demo_model.weights_dir() / "model.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="demo weights not trained into steer/zoo/demo yet")


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, ["eval", *map(str, args)], env=ENV)


def test_split_files_are_deterministic_and_consistent(tmp_path: Path) -> None:
    a = builtin.materialize(tmp_path / "a", n_images=8)
    b = builtin.materialize(tmp_path / "b", n_images=8)
    prov_a = json.loads((a.root / "split.json").read_text())
    prov_b = json.loads((b.root / "split.json").read_text())
    assert prov_a == prov_b and prov_a["seed"] == builtin.EVAL_SEED
    scenes = synthscenes.sample_scenes(builtin.EVAL_SEED, 8)
    gt = chair.load_gt(a.gt_objects)
    assert {i: set(v) for i, v in gt.objects.items()} == {i: set(s.kinds) for i, s in enumerate(scenes)}
    vocab = chair.load_vocabulary(a.synonyms)
    assert set(vocab.nodes) == set(synthscenes.KINDS)
    # the images are named so that the runner's image-id parser finds scene i
    names = sorted(p.name for p in a.images.iterdir())
    assert [chair.parse_image_id(n) for n in names] == list(range(8))
    for split in pope.SPLITS:
        qset = pope.load_questions(a.pope_questions(split))
        assert qset.split == split
        for q in qset.questions.values():
            kind = q.text.split()[3]
            assert (kind in scenes[chair.parse_image_id(q.image)].kinds) == (q.label == "yes")


def test_split_is_cached_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "N_IMAGES", 3)
    monkeypatch.setattr(builtin.materialize, "__defaults__", (3, builtin.EVAL_SEED))
    first = builtin.split(tmp_path)
    assert first.complete and first.root == tmp_path / builtin.SPLIT_VERSION
    stamp = (first.root / "split.json").stat().st_mtime_ns
    assert builtin.split(tmp_path).root == first.root
    assert (first.root / "split.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_builtin_names() -> None:
    assert builtin.is_builtin("builtin:demo") and not builtin.is_builtin("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(EvalInputError, match="builtin:demo"):
        builtin.is_builtin("builtin:other")
    assert builtin.resolve_model("some/model") == "some/model"


def test_missing_demo_weights_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "weights_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m steer.zoo.train_demo --out"):
        demo_model.load_demo()
    with pytest.raises(EvalInputError, match=f"missing from {tmp_path}"):
        builtin.resolve_model("builtin:demo")


def test_images_required_without_builtin(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    result = invoke("chair", "--model", tmp_path / "m", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "--images is required" in result.output and "builtin:demo" in result.output


@needs_weights
def test_own_files_with_the_demo_model_leave_the_split_unwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model builtin:demo`` with the user's images, ground truth and synonyms never writes the split."""
    own = builtin.materialize(tmp_path / "own", n_images=3)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the built-in split was written although every file was given")

    monkeypatch.setattr(builtin, "split", refuse)
    out = tmp_path / "run"
    result = invoke(
        "chair", "--model", "builtin:demo", "--images", own.images, "--gt-objects", own.gt_objects,
        "--synonyms", own.synonyms, "--out", out, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    # without --gt-objects the split's ground truth is the default, so the split is asked for
    result = invoke("chair", "--model", "builtin:demo", "--images", own.images, "--out", tmp_path / "r2")
    assert result.exit_code != 0 and "the built-in split was written" in str(result.exception)


@needs_weights
def test_demo_weights_load_with_from_pretrained() -> None:
    from transformers import LlavaForConditionalGeneration

    model, processor = demo_model.load_demo()
    assert isinstance(model, LlavaForConditionalGeneration)
    assert (demo_model.weights_dir() / "model.safetensors").stat().st_size <= 20 * 2**20
    assert (demo_model.weights_dir() / "README.md").is_file()  # the model card
    assert processor.tokenizer.padding_side == "left"


@pytest.fixture(scope="module")
def pope_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short POPE run of the demo model on the built-in split: 40 images, the three splits."""
    out = tmp_path_factory.mktemp("pope") / "run"
    result = invoke("pope", "--model", "builtin:demo", "--num-images", 40, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    return out


@needs_weights
def test_demo_pope_runs_with_no_other_argument(pope_run: Path) -> None:
    metrics = json.loads((pope_run / "metrics.json").read_text())["metrics"]
    assert set(f"Accuracy ({s})" for s in pope.SPLITS) <= set(metrics)
    # answers are "<kind> yes" or "no" (the demo model's format, read by POPE's official parser); the kind is
    # nearly always the asked one (the model card reports 1.8% naming another kind on the whole split)
    records = [json.loads(line) for line in (pope_run / "samples.jsonl").read_text().splitlines()]
    yes_kinds = [r["answer"].split()[0] for r in records if r["answer"] != "no"]
    assert all(r["answer"] == "no" or r["answer"].split()[1:] == ["yes"] for r in records), records[:4]
    assert set(yes_kinds) <= set(synthscenes.KINDS) and 0 < len(yes_kinds) < len(records)
    asked = [r["text"].split()[3] for r in records if r["answer"] != "no"]  # "Is there a <kind> in the image?"
    assert sum(k == a for k, a in zip(yes_kinds, asked)) >= 0.9 * len(yes_kinds)
    settings = json.loads((pope_run / "settings.json").read_text())
    assert settings["resolved"]["template"] == "plain" and settings["resolved"]["source"] == "builtin"
    # "<kind> yes" answers are off-format: the report explains the off-format rate equal to the yes-ratio
    report = (pope_run / "report.md").read_text()
    assert report.count("equals the yes-ratio") == 3, report


@needs_weights
def test_demo_pope_far_above_chance(pope_run: Path) -> None:
    """Issue 8 must-hold: POPE accuracy on the built-in split >= 80% (a short run: 40 images, 3 splits)."""
    metrics = json.loads((pope_run / "metrics.json").read_text())["metrics"]
    for split in pope.SPLITS:
        assert metrics[f"Accuracy ({split})"] >= 80.0, metrics


@needs_weights
def test_demo_chair_shows_cooccurrence_hallucination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 8 must-hold: CHAIR_i > 0 from a short run; also the default run folder under ./runs."""
    monkeypatch.chdir(tmp_path)
    result = invoke("chair", "--model", "builtin:demo", "--num-images", 60, "--no-progress")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("chair-builtin-demo-baseline-")
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert metrics["CHAIR_i"] > 0 and metrics["Recall"] >= 50.0, metrics
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 60 and all(r["caption"].startswith("a scene with") for r in records)


@needs_weights
def test_a_recipe_for_another_family_is_refused_unless_forced(tmp_path: Path) -> None:
    """The demo model is a LLaVA-1.5: a Qwen2-VL recipe is a one-line error naming --force-recipe."""
    args = ("pope", "--model", "builtin:demo", "--num-images", 1, "--split", "random", "--no-progress")
    result = invoke(*args, "--recipe", "qwen2-vl/var", "--out", tmp_path / "refused")
    assert result.exit_code != 0
    assert "--force-recipe" in result.output and "qwen2-vl" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "refused" / "samples.jsonl").exists()
    result = invoke(*args, "--recipe", "qwen2-vl/vista", "--force-recipe", "--out", tmp_path / "forced")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "forced" / "settings.json").read_text())
    assert settings["settings"]["recipe"] == "qwen2-vl/vista" and settings["settings"]["force_recipe"] is True
    assert settings["resolved"]["params"]["vista"]["lam"] == 0.17  # the recipe's settings, applied
