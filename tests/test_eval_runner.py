"""`steer eval`: generation + scoring in one resumable run, on the tiny zoo LLaVA with a handful of images."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from steer import zoo
from steer.cli import app
from steer.evals import generation, pope, prompts, run, tasks
from steer.evals.loading import load_model
from steer.evals.settings import EvalSettings, SettingsMismatchError, check_settings

DATA = Path(__file__).parent / "data"
IDS = [int(x) for x in (DATA / "opera500_image_ids.txt").read_text().split()[:6]]
ENV = {"COLUMNS": "200"}
GENERATE = generation.generate_batch


def coco_name(image_id: int, suffix: str = ".jpg") -> str:
    return f"COCO_val2014_{image_id:012d}{suffix}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo.save("llava", tmp_path_factory.mktemp("eval") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six COCO-named images (JPEG and PNG) whose ids are in the shipped CHAIR ground truth."""
    folder = tmp_path_factory.mktemp("images")
    for i, image_id in enumerate(IDS):
        suffix = ".png" if i % 3 == 2 else ".jpg"
        zoo.sample_image(i, (64 + 8 * i, 48)).save(folder / coco_name(image_id, suffix))
    return folder


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, ["eval", *map(str, args)], env=ENV)


def chair_args(model_dir: Path, images: Path, out: Path, *extra: Any) -> list[Any]:
    return [
        "chair", "--model", model_dir, "--images", images, "--max-new-tokens", 8, "--batch-size", 2,
        "--out", out, *extra,
    ]  # fmt: skip


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_generate(loaded: Any, prompts: list[str], imgs: list[Any], generation: Any) -> list[tuple[str, int]]:
    """A stand-in for the model where the test is about the runner, not about generation."""
    return [(f"A dog sits on a table ({img.size[0]} px wide).", 9) for img in imgs]


def count_generations(
    monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None, fake: bool = False
) -> list[int]:
    """Wrap the generate step: count the samples it generates; optionally Ctrl-C once `fail_after` are done."""
    done: list[int] = []
    inner = fake_generate if fake else GENERATE

    def wrapped(loaded: Any, prompts: list[str], imgs: list[Any], generation: Any) -> Any:
        if fail_after is not None and len(done) >= fail_after:
            raise KeyboardInterrupt
        done.extend(range(len(prompts)))
        return inner(loaded, prompts, imgs, generation)

    monkeypatch.setattr(generation, "generate_batch", wrapped)
    return done


@pytest.fixture(scope="module")
def baseline(model_dir: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("runs") / "baseline"
    result = invoke(*chair_args(model_dir, images, out))
    return out, result


def test_chair_end_to_end(baseline: tuple[Path, Any]) -> None:
    out, result = baseline
    assert result.exit_code == 0, result.output
    records = lines(out / "samples.jsonl")
    assert sorted(r["image_id"] for r in records) == sorted(IDS)
    # canonical order: sorted ids (the folder does not hold all of OPERA-500)
    assert [r["image_id"] for r in records] == sorted(IDS)
    assert all(isinstance(r["caption"], str) and 1 <= r["n_generated_tokens"] <= 8 for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"CHAIR_s", "CHAIR_i", "Recall", "Len"} <= set(metrics["metrics"])
    assert metrics["samples"] == {"total": 6, "scored": 6, "errors": 0}
    assert metrics["details"]["overall"]["counts"]["captions"] == 6
    assert metrics["settings"]["max_new_tokens"] == 8 and metrics["method"] == "baseline"
    assert metrics["resolved"]["template"] == "llava_v1" and metrics["resolved"]["source"] == "zoo"
    report = (out / "report.md").read_text()
    assert "## Settings" in report and "| max_new_tokens | 8 |" in report and "## Metrics" in report
    assert "## Anchors" in report and "## Hallucinated objects" in report
    assert "sample/s" in result.output  # the progress bar shows throughput
    assert "CHAIR_s" in result.output


def test_rerun_of_a_finished_run_generates_nothing(
    baseline: tuple[Path, Any], model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(baseline[0], out)
    before = (out / "samples.jsonl").read_text()
    done = count_generations(monkeypatch)
    result = invoke(*chair_args(model_dir, images, out, "--batch-size", 3))  # batch size may change
    assert result.exit_code == 0, result.output
    assert done == [] and "nothing left to generate" in result.output
    assert (out / "samples.jsonl").read_text() == before


def test_different_settings_are_refused(baseline: tuple[Path, Any], model_dir: Path, images: Path) -> None:
    out = baseline[0]
    before = (out / "samples.jsonl").read_text()
    result = invoke(*chair_args(model_dir, images, out)[:-2], "--max-new-tokens", 9, "--out", out)
    assert result.exit_code == 2
    assert "different settings" in result.output and "max_new_tokens: 8 -> 9" in result.output
    assert (out / "samples.jsonl").read_text() == before


def test_interrupt_then_resume_loses_and_duplicates_nothing(
    baseline: tuple[Path, Any], model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = chair_args(model_dir, images, out)
    count_generations(monkeypatch, fail_after=3)
    first = invoke(*args[:-4], "--batch-size", 3, "--out", out)
    assert first.exit_code == 130, first.output
    assert "run the same command again to resume" in first.output
    assert len(lines(out / "samples.jsonl")) == 3 and not (out / "metrics.json").exists()

    done = count_generations(monkeypatch)
    second = invoke(*args[:-4], "--batch-size", 3, "--out", out)
    assert second.exit_code == 0, second.output
    assert len(done) == 3  # only the missing samples were generated
    records = lines(out / "samples.jsonl")
    assert [r["key"] for r in records] == [str(i) for i in sorted(IDS)]  # none lost, none duplicated
    # greedy generations do not depend on how the run was split up
    assert records == lines(baseline[0] / "samples.jsonl")
    assert json.loads((out / "metrics.json").read_text())["samples"]["total"] == 6


def test_half_written_last_line_is_dropped_and_redone(
    baseline: tuple[Path, Any], model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "crashed"
    shutil.copytree(baseline[0], out)
    (out / "metrics.json").unlink()
    text = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(text[:2]) + text[2][:25])  # a crash in the middle of line 3
    done = count_generations(monkeypatch, fake=True)
    result = invoke(*chair_args(model_dir, images, out))
    assert result.exit_code == 0, result.output
    assert len(done) == 4  # the half-written sample is redone, the two complete ones are kept
    records = lines(out / "samples.jsonl")
    assert [r["key"] for r in records] == [str(i) for i in sorted(IDS)]
    assert records[:2] == lines(baseline[0] / "samples.jsonl")[:2]
    assert all(r["caption"].startswith("A dog") for r in records[2:])


def test_method_is_applied_and_recorded(
    model_dir: Path, images: Path, tmp_path: Path, baseline: tuple[Path, Any]
) -> None:
    out = tmp_path / "steered"
    args = chair_args(
        model_dir, images, out, "--method", "image_attention", "-p", "scale=3.0", "--batch-size", 6
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["methods"] == ["image_attention"]
    assert settings["settings"]["params"] == {"scale": 3.0}
    assert settings["resolved"]["params"]["image_attention"]["scale"] == 3.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "image_attention"
    assert settings["hash"] != json.loads((baseline[0] / "settings.json").read_text())["hash"]
    assert "image_attention" in (out / "report.md").read_text()

    compare = invoke("compare", baseline[0], out)
    assert compare.exit_code == 0, compare.output
    text = compare.output
    assert "baseline" in text and "image_attention" in text and "CHAIR_s" in text and "Δ" in text
    assert str(out.name) in text
    data = json.loads(invoke("compare", baseline[0], out, "--json").output)
    assert [r["method"] for r in data["runs"]] == ["baseline", "image_attention"]
    first, second = data["runs"]
    assert first["deltas"] is None
    delta = second["deltas"]["Len"]
    assert delta["delta"] == pytest.approx(second["metrics"]["Len"] - first["metrics"]["Len"])
    assert delta["approx"] is False and delta["n"] == 6  # paired over the six images of both runs
    assert delta["spans_zero"] == (delta["interval"][0] <= 0 <= delta["interval"][1])


def test_unknown_method_is_a_clean_error(model_dir: Path, images: Path, tmp_path: Path) -> None:
    result = invoke(*chair_args(model_dir, images, tmp_path / "bad", "--method", "no_such_method"))
    assert result.exit_code == 2
    assert "no_such_method" in result.output


def test_unreadable_image_is_an_error_record_and_the_run_goes_on(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    broken = next(folder.glob("*.jpg"))
    broken.write_bytes(b"this is not an image \x00\xff" * 10)
    out = tmp_path / "run"
    done = count_generations(monkeypatch, fake=True)
    result = invoke(*chair_args(model_dir, folder, out))
    assert result.exit_code == 0, result.output
    assert len(done) == 5
    records = lines(out / "samples.jsonl")
    assert len(records) == 6
    errors = [r for r in records if r.get("error")]
    assert len(errors) == 1 and errors[0]["image"] == broken.name and errors[0]["caption"] is None
    assert "unreadable image" in errors[0]["error"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == {"total": 6, "scored": 5, "errors": 1}
    assert metrics["details"]["overall"]["counts"]["captions"] == 5
    assert broken.name in (out / "report.md").read_text().split("## Errors")[1]


def test_report_lists_hallucinated_objects(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(loaded: Any, prompts: list[str], imgs: list[Any], generation: Any) -> list[tuple[str, int]]:
        return [("A giraffe stands next to a surfboard and a man.", 12) for _ in prompts]

    monkeypatch.setattr(generation, "generate_batch", fake)
    out = tmp_path / "run"
    result = invoke(*chair_args(model_dir, images, out))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    counts = metrics["details"]["overall"]["counts"]
    assert counts["mentions"] == 18 and counts["hallucinated_mentions"] > 0
    assert metrics["metrics"]["CHAIR_s"] > 0
    section = (out / "report.md").read_text().split("## Hallucinated objects")[1]
    assert "giraffe" in section and "**giraffe**" in section


def write_questions(path: Path) -> list[dict[str, Any]]:
    questions = []
    for i, image_id in enumerate(IDS[:3]):
        for j, (obj, label) in enumerate((("person", "yes"), ("zebra", "no"))):
            questions.append(
                {
                    "question_id": 2 * i + j + 1,
                    "image": coco_name(image_id, ".png" if i == 2 else ".jpg"),
                    "text": f"Is there a {obj} in the image?",
                    "label": label,
                }
            )
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return questions


def test_pope_end_to_end(model_dir: Path, images: Path, tmp_path: Path) -> None:
    qfile = tmp_path / "questions.jsonl"
    questions = write_questions(qfile)
    out = tmp_path / "pope"
    args = ["pope", "--model", model_dir, "--images", images, "--questions", qfile, "--max-new-tokens", 4]
    result = invoke(*args, "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    records = lines(out / "samples.jsonl")
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
    md5 = pope.load_questions(qfile).md5
    assert all(r["questions_md5"] == md5 and r["split"] == "random" for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"Accuracy", "Precision", "Recall", "F1", "Yes-ratio", "Off-format"} <= set(metrics["metrics"])
    yes = sum(pope.parse_answer(r["answer"]) == "yes" for r in records)
    assert metrics["metrics"]["Yes-ratio"] == round(100 * yes / 6, 2)
    assert metrics["details"]["splits"]["random"]["n"] == 6
    settings = json.loads((out / "settings.json").read_text())
    assert "Answer the question using a single word or phrase." in settings["resolved"]["prompt_example"]
    # the answers file scores the same with `steer pope score`
    scored = CliRunner().invoke(
        app, ["pope", "score", "--answers", out / "samples.jsonl", "--questions", qfile, "--json",
              "--out", tmp_path / "rescored.jsonl"],
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    flat = json.loads(scored.stdout.strip().splitlines()[-1])
    assert flat["F1"] == metrics["metrics"]["F1"] and flat["Accuracy"] == metrics["metrics"]["Accuracy"]
    # a missing image fails early, naming it
    (tmp_path / "few").mkdir()
    missing = invoke(*args[:3], "--images", tmp_path / "few", *args[5:], "--out", tmp_path / "nope")
    assert missing.exit_code == 2 and coco_name(IDS[0]) in missing.output


def test_pope_with_scripted_answers_scores_exactly(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qfile = tmp_path / "questions.jsonl"
    write_questions(qfile)
    answers = iter(["Yes.", "Yes, there is.", "No", "no", "Yes", "There is no zebra."])

    def fake(loaded: Any, prompts: list[str], imgs: list[Any], generation: Any) -> list[tuple[str, int]]:
        return [(next(answers), 2) for _ in prompts]

    monkeypatch.setattr(generation, "generate_batch", fake)
    out = tmp_path / "pope"
    result = invoke(
        "pope",
        "--model",
        model_dir,
        "--images",
        images,
        "--questions",
        qfile,
        "--out",
        out,
        "--batch-size",
        2,
    )
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())["details"]["splits"]["random"]
    # labels yes,no,yes,no,yes,no; predictions yes,yes,no,no,yes,no -> TP 2, FP 1, TN 2, FN 1
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["yes_ratio"] == pytest.approx(0.5)


def _loader(model_dir: Path) -> Callable[[], Any]:
    def load() -> Any:
        loaded = load_model(str(model_dir))
        return loaded, prompts.resolve_template("auto", loaded.model_type, loaded.processor)

    return load


def test_two_shards_merge_to_the_single_process_result(
    baseline: tuple[Path, Any], model_dir: Path, images: Path, tmp_path: Path
) -> None:
    task = tasks.chair_task(images)
    base = json.loads((baseline[0] / "settings.json").read_text())["settings"]
    settings = EvalSettings(**base)
    assert settings.stable_hash() == json.loads((baseline[0] / "settings.json").read_text())["hash"]
    out = tmp_path / "sharded"
    load = _loader(model_dir)
    check_settings(out, settings, write=True)
    stats = [
        run.generate_shard(task, settings, out, load, rank=rank, world_size=2, progress=False)
        for rank in (1, 0)
    ]
    assert [s.generated for s in stats] == [3, 3]
    assert sorted(p.name for p in out.glob("samples*.jsonl")) == [
        "samples.rank0.jsonl",
        "samples.rank1.jsonl",
    ]
    assert [r["image_id"] for r in lines(out / "samples.rank0.jsonl")] == sorted(IDS)[0::2]
    payload = run.finish_run(task, settings, out)
    assert sorted(p.name for p in out.glob("samples*.jsonl")) == ["samples.jsonl"]
    assert (out / "samples.jsonl").read_text() == (baseline[0] / "samples.jsonl").read_text()
    assert payload["metrics"] == json.loads((baseline[0] / "metrics.json").read_text())["metrics"]
    # a shard that was interrupted resumes on its own file; the other shard's samples are not redone
    (out / "metrics.json").unlink()
    again = run.generate_shard(task, settings, out, load, rank=1, world_size=2, progress=False)
    assert again.generated == 0 and again.already_done == 3


def test_settings_hash_is_stable_and_ignores_batch_size() -> None:
    a = EvalSettings(task="chair", model="m", max_new_tokens=8, batch_size=1, selection={"n": 2, "a": 1})
    b = EvalSettings(task="chair", model="m", max_new_tokens=8, batch_size=16, selection={"a": 1, "n": 2})
    c = EvalSettings(task="chair", model="m", max_new_tokens=9)
    assert a.stable_hash() == b.stable_hash() != c.stable_hash()
    assert len(a.stable_hash()) == 16


def test_retry_errors_redoes_only_the_error_records(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    broken = next(folder.glob("*.jpg"))
    good = broken.read_bytes()
    broken.write_bytes(b"garbage")
    out = tmp_path / "run"
    done = count_generations(monkeypatch, fake=True)
    assert invoke(*chair_args(model_dir, folder, out)).exit_code == 0
    assert len(done) == 5
    broken.write_bytes(good)
    assert invoke(*chair_args(model_dir, folder, out)).exit_code == 0
    assert len(done) == 5  # errors are final unless asked
    result = invoke(*chair_args(model_dir, folder, out, "--retry-errors"))
    assert result.exit_code == 0, result.output
    assert len(done) == 6
    records = lines(out / "samples.jsonl")
    assert len(records) == 6 and not any(r.get("error") for r in records)
    assert json.loads((out / "metrics.json").read_text())["samples"]["errors"] == 0


def test_pope_several_splits_from_a_questions_folder(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qdir = tmp_path / "pope"
    qdir.mkdir()
    write_questions(qdir / "coco_pope_random.json")
    questions = write_questions(qdir / "coco_pope_popular.json")
    count_generations(monkeypatch, fake=True)
    out = tmp_path / "run"
    result = invoke(
        "pope", "--model", model_dir, "--images", images, "--questions-dir", qdir, "--pope-version", "current",
        "--split", "random", "--split", "popular", "--num-images", 2, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = lines(out / "samples.jsonl")
    assert [r["key"] for r in records] == [
        f"{s}/{q['question_id']}" for s in ("random", "popular") for q in questions[:4]
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"F1 (mean)", "Accuracy (mean)", "F1 (random)", "F1 (popular)"} <= set(metrics["metrics"])
    assert metrics["details"]["checks"]["recall_equal_across_splits"] is True
    assert metrics["settings"]["selection"]["n_images"] == 2


def test_settings_of_a_run_without_samples_may_change(tmp_path: Path) -> None:
    a = EvalSettings(task="chair", model="m", max_new_tokens=8)
    b = EvalSettings(task="chair", model="m", max_new_tokens=9)
    assert check_settings(tmp_path, a) is False
    assert check_settings(tmp_path, a) is True
    assert check_settings(tmp_path, b) is False  # nothing generated yet (e.g. the model failed to load)
    (tmp_path / "samples.jsonl").write_text('{"key": "1", "image_id": 1, "caption": "x"}\n')
    with pytest.raises(SettingsMismatchError, match="max_new_tokens: 9 -> 8"):
        check_settings(tmp_path, a)


def test_anchors_for_llava_15_7b() -> None:
    from steer.evals import report

    settings = EvalSettings(
        task="chair", model="llava-hf/llava-1.5-7b-hf", max_new_tokens=512, selection={"source": "opera500"}
    )
    payload = {
        "task": "chair",
        "settings": settings.to_dict(),
        "resolved": {"template": "llava_v1"},
        "method": "baseline",
        "metrics": {"CHAIR_s": 46.0},
    }
    (anchor,) = report.anchors_for(payload)
    assert anchor["metrics"]["CHAIR_s"] == 45.0 and anchor["mismatches"] == []
    short = {**payload, "settings": {**payload["settings"], "max_new_tokens": 64}}
    assert "max_new_tokens 64 (anchor 512)" in report.anchors_for(short)[0]["mismatches"]
    assert report.anchors_for({**payload, "settings": {**payload["settings"], "model": "/x/tiny"}}) == []


# -------------------------------------------------------------------- provenance, sampling, report.html


def test_metrics_carry_full_provenance(baseline: tuple[Path, Any], model_dir: Path) -> None:
    import hashlib

    out = baseline[0]
    metrics = json.loads((out / "metrics.json").read_text())
    prov = metrics["provenance"]
    assert prov["recorded"] == "at generation"
    assert {"steer", "torch", "transformers", "diffusers"} <= {k for k, v in prov["versions"].items() if v}
    assert prov["git"] is not None and len(prov["git"]["commit"]) == 40  # run from a checkout
    assert (prov["device"], prov["dtype"]) == ("cpu", "float32")
    model = prov["model"]
    assert model["name"] == str(model_dir.resolve()) and model["path"] == str(model_dir.resolve())
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert model["weights"]["files"] == {"model.safetensors": weights}
    assert prov["seed"] == 0 and prov["method_params"] == {}
    effective = prov["generation"]["effective"]
    assert (
        effective["max_new_tokens"] == 8 and effective["do_sample"] is False and effective["num_beams"] == 1
    )
    assert metrics["intervals"].keys() == metrics["metrics"].keys()
    assert metrics["bootstrap"]["unit"] == "image" and metrics["bootstrap"]["n_units"] == 6
    text = (out / "report.md").read_text()
    assert "## Provenance" in text and model["weights"]["sha256"] in text and "95% interval" in text


def test_sampling_is_seeded_and_part_of_the_run(model_dir: Path, images: Path, tmp_path: Path) -> None:
    sample = ["--do-sample", "--temperature", "1.5", "--top-p", "0.95"]
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = invoke(*chair_args(model_dir, images, tmp_path / name, *sample, "--seed", seed))
        assert result.exit_code == 0, result.output
        runs[name] = (tmp_path / name / "samples.jsonl").read_text()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    saved = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert (saved["settings"]["seed"], saved["settings"]["temperature"], saved["settings"]["top_p"]) == (
        3,
        1.5,
        0.95,
    )
    effective = json.loads((tmp_path / "a" / "metrics.json").read_text())["provenance"]["generation"][
        "effective"
    ]
    assert effective["do_sample"] is True and effective["temperature"] == 1.5 and effective["top_p"] == 0.95
    again = invoke(*chair_args(model_dir, images, tmp_path / "a", *sample, "--seed", 4))
    assert again.exit_code == 2 and "seed: 3 -> 4" in again.output
    greedy_with_temperature = invoke(*chair_args(model_dir, images, tmp_path / "d", "--temperature", "0.5"))
    assert greedy_with_temperature.exit_code == 2 and "add --do-sample" in greedy_with_temperature.output


def test_report_html_gallery_highlights_hallucinations(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(loaded: Any, prompts: list[str], imgs: list[Any], generation: Any) -> list[tuple[str, int]]:
        return [("A giraffe stands next to a man.", 8) for _ in prompts]

    monkeypatch.setattr(generation, "generate_batch", fake)
    out = tmp_path / "run"
    assert invoke(*chair_args(model_dir, images, out)).exit_code == 0
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count('<div class="card">') == 6
    assert page.count("data:image/jpeg;base64,") == 6  # every image embedded
    assert '<mark class="h">giraffe</mark>' in page and "data:image/png;base64," in page  # and the chart
    assert "Provenance" in page and "95% bootstrap interval" in page


def test_torchrun_shards_a_run_over_two_cpu_processes(
    baseline: tuple[Path, Any], model_dir: Path, images: Path, tmp_path: Path
) -> None:
    """The README's CPU launcher: `torchrun --nproc_per_node 2 -m steer.cli eval ...` (gloo) starts two
    processes that share the samples; process 0 merges them into the single-process result."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200")
    out = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "steer.cli", "eval", *map(str, chair_args(model_dir, images, out)), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on process 0 of 2" in done.stderr
    assert sorted(p.name for p in out.glob("samples*.jsonl")) == ["samples.jsonl"]
    assert (out / "samples.jsonl").read_text() == (baseline[0] / "samples.jsonl").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"] == json.loads((baseline[0] / "metrics.json").read_text())["metrics"]


def test_ground_truth_and_synonyms_of_other_benchmarks_fail_before_generating(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steer.evals import builtin

    split = builtin.materialize(tmp_path / "split", n_images=3)
    done = count_generations(monkeypatch, fake=True)
    coco = tmp_path / "coco_synonyms.txt"
    coco.write_text("dog, puppy\ncat\n")
    args = ["chair", "--model", model_dir, "--images", split.images, "--gt-objects", split.gt_objects]
    wrong = invoke(*args, "--synonyms", coco, "--out", tmp_path / "wrong")
    assert wrong.exit_code == 2 and "not in the synonym table" in wrong.output and done == []
    # the split's ground truth brings its own table
    right = invoke(*args, "--out", tmp_path / "right", "--no-progress")
    assert right.exit_code == 0, right.output
    assert len(done) == 3
    config = json.loads((tmp_path / "right" / "metrics.json").read_text())["details"]["config"]
    assert config["synonyms_source"] == str(split.synonyms.resolve())
