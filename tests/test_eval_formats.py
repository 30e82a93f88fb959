"""`steer eval` inputs in the ecosystem's formats: Hugging Face datasets (save_to_disk folders, parquet) for
--images and --questions, a COCO instances JSON as CHAIR ground truth, POPE off-format answers explained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from steer import zoo
from steer.cli import app
from steer.evals import formats, generation

datasets = pytest.importorskip("datasets")  # the `data` extra

DATA = Path(__file__).parent / "data"
IDS = [int(x) for x in (DATA / "opera500_image_ids.txt").read_text().split()[:4]]


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, ["eval", *map(str, args)], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo.save("llava", tmp_path_factory.mktemp("formats") / "model")


@pytest.fixture(autouse=True)
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's answers: "person yes" (off-format, as the demo model answers) when asked about a person, else
    "no"; a short caption for CHAIR."""

    def fake(loaded: Any, prompts: list[str], imgs: list[Any], gen: Any) -> list[tuple[str, int]]:
        return [
            ("A dog on a table." if "describe" in p else ("person yes" if "person" in p else "no"), 3)
            for i, p in enumerate(prompts)
        ]

    monkeypatch.setattr(generation, "generate_batch", fake)


def image_dataset() -> Any:
    images = [zoo.sample_image(i, (40 + 8 * i, 32)) for i in range(len(IDS))]
    return datasets.Dataset.from_dict(
        {"image": images, "image_id": IDS, "file_name": [f"COCO_val2014_{i:012d}.jpg" for i in IDS]}
    ).cast_column("image", datasets.Image())


def test_images_from_a_saved_dataset_and_from_parquet(model_dir: Path, tmp_path: Path) -> None:
    ds = image_dataset()
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "images.parquet"))
    assert formats.is_dataset(tmp_path / "saved") and formats.is_dataset(tmp_path / "images.parquet")
    folder = formats.extract_images(tmp_path / "saved", progress=False)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        f"COCO_val2014_{i:012d}.png"
        for i in IDS  # PNG bytes keep their format; the name keeps the id
    )
    assert formats.extract_images(tmp_path / "saved", progress=False) == folder  # cached
    for source in (tmp_path / "saved", tmp_path / "images.parquet"):
        out = tmp_path / f"run-{source.name}"
        result = invoke("chair", "--model", model_dir, "--images", source, "--out", out, "--no-progress")
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert [r["image_id"] for r in records] == sorted(IDS)


def test_pope_questions_and_images_from_one_dataset(model_dir: Path, tmp_path: Path) -> None:
    """lmms-lab/POPE's layout: question, answer, category, image_source and the image in every row."""
    rows: dict[str, list[Any]] = {
        k: [] for k in ("question_id", "question", "answer", "category", "image_source", "image")
    }
    for category in ("adversarial", "random"):
        for n, image_id in enumerate(IDS[:3]):
            for obj, answer in (("person", "yes"), ("zebra", "no")):
                rows["question_id"].append(str(len(rows["question_id"]) % 6 + 1))
                rows["question"].append(f"Is there a {obj} in the image?")
                rows["answer"].append(answer)
                rows["category"].append(category)
                rows["image_source"].append(f"COCO_val2014_{image_id:012d}")
                rows["image"].append(zoo.sample_image(n, (48, 48)))
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "pope.parquet"))
    out = tmp_path / "run"
    result = invoke(
        "pope", "--model", model_dir, "--questions", tmp_path / "pope.parquet", "--split", "adversarial",
        "--split", "random", "--out", out, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["details"]["splits"]["adversarial"]["n"] == 6
        and metrics["details"]["splits"]["random"]["n"] == 6
    )
    assert metrics["settings"]["selection"]["n_images"] == 3
    # "person yes": every yes is off-format, and the report says why instead of leaving a puzzle
    assert metrics["metrics"]["Off-format (random)"] == metrics["metrics"]["Yes-ratio (random)"] == 50.0
    text = (out / "report.md").read_text()
    assert "Off-format (random) 50.0 equals the yes-ratio" in text and "'person yes'" in text
    page = (out / "report.html").read_text()
    assert "equals the yes-ratio" in page and page.count("data:image/jpeg;base64,") == 3  # one card per image
    missing = invoke("pope", "--model", model_dir, "--questions", tmp_path / "pope.parquet", "--split", "popular",
                     "--out", tmp_path / "r2")  # fmt: skip
    assert missing.exit_code == 2 and "no questions for split 'popular'" in missing.output


def test_dataset_input_errors_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"image_id": [1, 2]}).to_parquet(str(tmp_path / "ids.parquet"))
    result = invoke(
        "chair", "--model", model_dir, "--images", tmp_path / "ids.parquet", "--out", tmp_path / "r"
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "has no image column" in result.output
    datasets.Dataset.from_dict({"question": ["Is there a cat?"], "image": ["x_1.jpg"]}).to_parquet(
        str(tmp_path / "q.parquet")
    )
    (tmp_path / "images").mkdir()
    result = invoke("pope", "--model", model_dir, "--questions", tmp_path / "q.parquet", "--images",
                    tmp_path / "images", "--out", tmp_path / "r3")  # fmt: skip
    assert (
        result.exit_code == 2
        and "no answer/label column" in result.output
        and "Traceback" not in result.output
    )
