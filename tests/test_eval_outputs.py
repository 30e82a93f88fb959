"""What a finished run gives back: intervals (bootstrap over images), provenance, `steer eval compare` in every
format, the compare chart and the pictures, sampling settings and their hash; mostly without a model."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from steer import errors
from steer.cli import app
from steer.evals import bootstrap, chair, plots, pope, provenance, report
from steer.evals.options import RunOptions
from steer.evals.settings import EvalSettings, check_settings

DATA = Path(__file__).parent / "data"
CAPTIONS = DATA / "llava15_7b_greedy_512_opera.jsonl"
GT_500 = DATA / "chair_gt_opera500.json"


def invoke(*args: Any, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, ["eval", *map(str, args)], env={"COLUMNS": "80", **(env or {})})


# --------------------------------------------------------------------------------------------------
# bootstrap intervals (item 16)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anchor_scored() -> dict[str, Any]:
    return chair.score_captions(chair.load_captions(CAPTIONS), chair.load_gt(GT_500))


def test_chair_intervals_are_seeded_and_contain_the_metric(anchor_scored: dict[str, Any]) -> None:
    from steer.evals.metrics import chair_metrics

    units = bootstrap.chair_units(anchor_scored["captions"])
    assert len(units) == 500
    metrics = chair_metrics(anchor_scored["overall"])
    # the counts reproduce the scorer exactly
    points = bootstrap.point_estimates(units)
    assert {k: round(v, 1) for k, v in points.items()} == metrics
    first, second = bootstrap.intervals(units), bootstrap.intervals(units)
    assert first == second and set(first) == set(metrics)  # deterministic, every metric
    for name, (lo, hi) in first.items():
        assert lo <= metrics[name] <= hi and lo < hi, name
    assert first["CHAIR_s"] == [40.6, 49.6]  # pinned: the same on every machine
    assert bootstrap.intervals(units, seed=1) != first


def test_pope_intervals_over_images_for_every_split_metric() -> None:
    qset = pope.load_questions(DATA / "coco_pope_random.json.gz")
    answers = [
        pope.Answer(q.question_id, "Yes" if q.question_id % 3 else "No") for q in qset.questions.values()
    ]
    result = pope.score_answers(answers, qset)
    records = [{**r, "split": s} for s in ("random", "popular") for r in result["records"]]
    units = bootstrap.pope_units(records, ["random", "popular"])
    assert len(units) == 500  # one unit per image, both splits together
    intervals = bootstrap.intervals(units)
    names = {"F1 (mean)", "Accuracy (mean)"} | {
        f"{m} ({s})" for m in ("Accuracy", "F1", "Yes-ratio") for s in ("random", "popular")
    }
    assert names <= set(intervals)
    assert intervals["F1 (random)"] == intervals["F1 (popular)"]  # same answers, same resampled images
    point = round(100 * result["metrics"]["f1"], 2)
    assert intervals["F1 (random)"][0] <= point <= intervals["F1 (random)"][1]


def test_paired_differences_mark_what_spans_zero(anchor_scored: dict[str, Any]) -> None:
    units = bootstrap.chair_units(anchor_scored["captions"])
    same = bootstrap.paired_differences(units, units)
    assert all(d["delta"] == 0 and d["interval"] == [0.0, 0.0] and d["spans_zero"] for d in same.values())
    # a run that hallucinates on 50 more images: a real difference, its interval excludes 0
    counts = {k: v.copy() for k, v in units.counts.items()}
    clean = np.flatnonzero(counts["hallucinated_captions"] == 0)[:50]
    counts["hallucinated_captions"][clean] = 1
    worse = bootstrap.Units("chair", units.keys, counts)
    diff = bootstrap.paired_differences(units, worse)
    assert diff["CHAIR_s"]["delta"] == 10.0 and not diff["CHAIR_s"]["spans_zero"]
    assert diff["CHAIR_s"]["interval"][0] > 0 and diff["Recall"]["spans_zero"]
    assert bootstrap.Units.from_json(json.loads(json.dumps(worse.to_json()))).keys == units.keys


# --------------------------------------------------------------------------------------------------
# compare (items 8, 16, 17): synthetic finished runs
# --------------------------------------------------------------------------------------------------


def make_run(
    folder: Path,
    units: bootstrap.Units,
    *,
    method: str = "baseline",
    settings: dict[str, Any] | None = None,
    legacy: bool = False,
) -> Path:
    """A finished run folder as `steer eval` writes it (metrics.json, per_image.json), from per-image counts."""
    folder.mkdir(parents=True)
    decimals = 1 if units.task == "chair" else 2
    metrics = {k: round(v, decimals) for k, v in bootstrap.point_estimates(units).items()}
    selection = {"image_ids_md5": "abc", "gt_md5": "g", "n": len(units)} if units.task == "chair" else {
        "questions_md5": {"random": "q"}, "splits": list(units.splits), "n_images": len(units), "n": 6 * len(units)
    }  # fmt: skip
    base = EvalSettings(task=units.task, model="/models/demo", max_new_tokens=64, selection=selection)
    s = {**base.to_dict(), **(settings or {})}
    if method != "baseline":
        s["methods"] = [method]
    payload = {
        "task": units.task,
        "run_dir": str(folder),
        "settings": s,
        "method": method,
        "samples": {"total": len(units), "scored": len(units), "errors": 0},
        "metrics": metrics,
        "intervals": bootstrap.intervals(units),
    }
    if legacy:  # a run written before per_image.json and the CHAIR_s naming
        payload["metrics"] = {
            {"CHAIR_s": "CHAIRs", "CHAIR_i": "CHAIRi"}.get(k, k): v for k, v in metrics.items()
        }
        payload["intervals"] = {{"CHAIR_s": "CHAIRs"}.get(k, k): v for k, v in payload["intervals"].items()}
    else:
        report.write_units(folder, units)
    report.write_metrics(folder, payload)
    return folder


def chair_counts(seed: int, n: int = 120, halluc: float = 0.3) -> bootstrap.Units:
    rng = np.random.default_rng(seed)
    mentions = rng.integers(1, 6, n)
    counts = {
        "captions": np.ones(n, dtype=np.int64),
        "hallucinated_captions": (rng.random(n) < halluc).astype(np.int64),
        "mentions": mentions,
        "hallucinated_mentions": np.minimum(rng.integers(0, 2, n), mentions),
        "gt_objects": rng.integers(1, 5, n),
        "recalled": rng.integers(0, 2, n),
        "distinct_mentions": np.maximum(mentions - 1, 1),
        "tokens": rng.integers(40, 120, n),
    }
    return bootstrap.Units("chair", tuple(str(i) for i in range(n)), counts)


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    base = chair_counts(0)
    better = bootstrap.Units(
        "chair", base.keys, {**base.counts, "hallucinated_captions": np.zeros(120, dtype=np.int64)}
    )
    return [
        make_run(tmp_path / "chair-baseline", base),
        make_run(tmp_path / "chair-vhr", chair_counts(1), method="vhr"),
        make_run(tmp_path / "chair-vista", better, method="vista"),
        make_run(tmp_path / "chair-cca", chair_counts(3), method="cca"),
        make_run(tmp_path / "chair-fastervlm-with-a-rather-long-folder-name-for-the-legend", chair_counts(4), method="fastervlm"),
    ]  # fmt: skip


def test_compare_text_fits_80_columns_with_directions_and_marks(runs: list[Path]) -> None:
    result = invoke("compare", *runs)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "CHAIR_s ↓" in text and "Recall ↑" in text and "Len " in text
    assert text.count("metric ") >= 2  # five runs do not fit side by side: several blocks of columns
    delta_rows = [line for line in text.splitlines() if line.startswith("  Δ")]
    assert delta_rows and any("~" in line for line in delta_rows)
    # run 3 never hallucinates: its CHAIR_s difference is real (no ~ on that cell)
    data = json.loads(invoke("compare", *runs, "--format", "json").stdout)
    assert data["directions"]["CHAIR_s"] == "↓" and data["directions"]["Len"] == ""
    vista = data["runs"][2]["deltas"]["CHAIR_s"]
    assert vista["delta"] < 0 and not vista["spans_zero"] and vista["approx"] is False


def test_compare_markdown_csv_json(runs: list[Path]) -> None:
    md = invoke("compare", *runs[:2], "--format", "md").stdout
    assert "| metric | 1: baseline | 2: vhr |" in md and "| CHAIR_s ↓ |" in md and "(Δ " in md
    rows = list(csv.DictReader(io.StringIO(invoke("compare", *runs[:2], "--format", "csv").stdout)))
    assert len(rows) == 6 * 2 and rows[0]["metric"] == "CHAIR_s" and rows[0]["direction"] == "↓"
    second = next(r for r in rows if r["run"] == "2" and r["metric"] == "F1")
    assert float(second["delta_lo"]) <= float(second["delta"]) <= float(second["delta_hi"])
    assert json.loads(invoke("compare", *runs[:2], "--json").stdout)["task"] == "chair"
    bad = invoke("compare", *runs[:2], "--format", "xml")
    assert bad.exit_code == 2 and "unknown --format 'xml'" in bad.stderr


def test_compare_refuses_other_tasks_and_data_and_warns_on_settings(tmp_path: Path, runs: list[Path]) -> None:
    qset = pope.load_questions(DATA / "coco_pope_random.json.gz")
    result = pope.score_answers([pope.Answer(q, "Yes") for q in qset.questions], qset)
    pope_run = make_run(
        tmp_path / "pope",
        bootstrap.pope_units([{**r, "split": "random"} for r in result["records"]], ["random"]),
    )
    other = invoke("compare", runs[0], pope_run)
    assert other.exit_code == 2 and other.stderr.count("\n") == 1
    assert "different tasks" in other.stderr and "Traceback" not in other.output
    elsewhere = make_run(
        tmp_path / "other-images",
        chair_counts(5),
        settings={"selection": {"image_ids_md5": "zzz", "gt_md5": "g", "n": 120}},
    )
    refused = invoke("compare", runs[0], elsewhere)
    assert (
        refused.exit_code == 2
        and "other data" in refused.stderr
        and "image_ids_md5 abc vs zzz" in refused.stderr
    )
    forced = invoke("compare", runs[0], elsewhere, "--force")
    assert forced.exit_code == 0 and "warning: run 2" in forced.stderr
    longer = make_run(
        tmp_path / "longer", chair_counts(6), method="vhr", settings={"max_new_tokens": 512, "seed": 3}
    )
    warned = invoke("compare", runs[0], longer)
    assert warned.exit_code == 0
    assert "warning: run 2 differs from run 1 in settings other than the method" in warned.stderr
    assert "max_new_tokens 64 vs 512" in warned.stderr and "seed 0 vs 3" in warned.stderr
    assert invoke("compare", tmp_path / "nothing").exit_code == 2


def test_compare_reads_older_runs(tmp_path: Path, runs: list[Path]) -> None:
    old = make_run(tmp_path / "old", chair_counts(7), method="var", legacy=True)
    assert "CHAIRs" in json.loads((old / "metrics.json").read_text())["metrics"]
    data = json.loads(invoke("compare", runs[0], old, "--format", "json").stdout)
    assert "CHAIR_s" in data["metrics"] and "CHAIRs" not in data["metrics"]
    delta = data["runs"][1]["deltas"]["CHAIR_s"]
    assert delta["approx"] is True and delta["interval"][0] < delta["delta"] < delta["interval"][1]
    assert "a " in invoke("compare", runs[0], old).stdout or "a\n" in invoke("compare", runs[0], old).stdout


@pytest.mark.parametrize("drawer", ["matplotlib", "pil"])
def test_compare_bar_chart(
    runs: list[Path], tmp_path: Path, drawer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if drawer == "matplotlib":
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setenv("STEER_PLOTS", "pil")
    assert plots.backend() == drawer
    chart = tmp_path / "chart.png"
    result = invoke("compare", *runs[:3], "--plot", chart)
    assert result.exit_code == 0, result.output
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400


def test_before_after_grid_and_panels() -> None:
    before = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    after = [Image.new("RGB", (64, 64), "green"), Image.new("RGB", (64, 64), "white")]
    grid = plots.before_after_grid("a cat and a dog", before, after)
    assert grid.width >= 2 * 64 and grid.height >= 2 * 64 + 26
    with pytest.raises(ValueError):
        plots.before_after_grid("x", before, after[:1])
    heat = plots.heatmap(
        [[0.0, 1.0], [0.5, 0.2]], row_labels=["0", "1"], col_labels=["a", "b"], marks={(0, 1)}
    )
    assert heat.size == (420, 320)
    over = plots.overlay_grid(
        Image.new("RGB", (64, 64)), [[1.0, None], [0.0, 2.0]], labels=[["1", ""], ["0", "2"]]
    )
    assert over.width == 320


# --------------------------------------------------------------------------------------------------
# sampling settings and their hash (item 15)
# --------------------------------------------------------------------------------------------------


def test_hash_of_runs_made_before_the_sampling_settings_is_unchanged(tmp_path: Path) -> None:
    # hashes computed by steer before --seed/--temperature/--top-p existed
    assert EvalSettings(task="chair", model="m").stable_hash() == "477acf89428ee178"
    old = EvalSettings(
        task="pope", model="/x/y", methods=["vhr"], params={"alpha": 2}, max_new_tokens=16, selection={"n": 3}
    )
    assert old.stable_hash() == "5d75622e93128f97"
    # a settings.json written then (no seed, temperature, top_p): the same command resumes it
    saved = {k: v for k, v in old.to_dict().items() if k not in ("seed", "temperature", "top_p")}
    (tmp_path / "settings.json").write_text(
        json.dumps({"hash": "5d75622e93128f97", "settings": saved, "resolved": {}})
    )
    (tmp_path / "samples.jsonl").write_text('{"key": "random/1", "answer": "yes"}\n')
    assert check_settings(tmp_path, EvalSettings(**saved)) is True
    with pytest.raises(errors.EvalInputError, match="seed: '<unset>' -> 1"):
        check_settings(tmp_path, EvalSettings(**{**saved, "seed": 1}))


@pytest.mark.parametrize(
    "change", [{"seed": 1}, {"do_sample": True}, {"temperature": 0.7}, {"top_p": 0.9}, {"num_beams": 3}]
)
def test_every_sampling_setting_is_hashed(change: dict[str, Any]) -> None:
    assert (
        EvalSettings(task="chair", model="m", **change).stable_hash()
        != EvalSettings(task="chair", model="m").stable_hash()
    )


def test_sampling_options(tmp_path: Path) -> None:
    options, _ = RunOptions(
        model="m", images=tmp_path, do_sample=True, temperature=0.7, top_p=0.9, seed=5
    ).with_defaults("chair")
    options.check()
    s = options.settings("chair", {}, "p", None)
    assert (s.do_sample, s.temperature, s.top_p, s.seed) == (True, 0.7, 0.9, 5)
    assert s.generation_kwargs == {
        "max_new_tokens": 512,
        "do_sample": True,
        "num_beams": 1,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    greedy = RunOptions(model="m", images=tmp_path).with_defaults("chair")[0].settings("chair", {}, "p", None)
    assert "temperature" not in greedy.generation_kwargs and greedy.seed == 0
    for bad, message in (
        ({"temperature": 0.7}, "--temperature act only when sampling: add --do-sample"),
        ({"do_sample": True, "temperature": 0.0}, "--temperature must be > 0"),
        ({"do_sample": True, "top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
        ({"seed": -1}, "--seed must be >= 0"),
    ):
        with pytest.raises(errors.EvalInputError, match=message):
            RunOptions(model="m", images=tmp_path, **bad).with_defaults("chair")[0].check()


# --------------------------------------------------------------------------------------------------
# provenance (item 14)
# --------------------------------------------------------------------------------------------------


def test_weights_hash_reads_once_and_trusts_hub_blobs(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "config.json").write_text("{}")
    digest = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert provenance.file_sha256(folder / "model.safetensors") == (digest, "read")
    assert provenance.file_sha256(folder / "model.safetensors") == (digest, "cached")
    record = provenance.weights_hash(folder)
    assert record is not None and record["files"] == {"model.safetensors": digest}
    assert record["sha256"] == hashlib.sha256(f"model.safetensors {digest}\n".encode()).hexdigest()
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"not hashed")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").symlink_to(blob)
    assert provenance.file_sha256(tmp_path / "snap" / "model.safetensors") == ("ab" * 32, "hub-blob")
    assert provenance.weights_hash(tmp_path / "nothing") is None


def test_environment_names_versions_and_the_checkout() -> None:
    env = provenance.environment()
    assert env["torch"] and env["transformers"] and env["diffusers"] and env["steer"]
    git = env["git"]
    assert git is not None and len(git["commit"]) == 40  # the tests run from a checkout
    assert provenance.git_state(Path("/")) is None


def test_pipeline_demo_writes_a_before_after_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from steer.diffusers import demo

    demo.main(["--steps", "2", "--out", str(tmp_path)])
    assert "grid.png" in capsys.readouterr().out
    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "before.png") as before:
        assert grid.width >= 160 and grid.height >= 2 * max(before.height, 160)  # before row above after row


# --------------------------------------------------------------------------------------------------
# steer show (item 17): a picture of each method's Steering.state
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from steer import zoo

    return zoo.save("llava", tmp_path_factory.mktemp("show") / "model")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("fastervlm", []),
        ("vhr", []),
        ("cca", ["-p", "trained_checkpoint=true"]),
        ("vista", []),
        ("var", ["-p", "sink_dims=[0, 1, 2]", "-p", "tau=0.5"]),
        ("image_attention", ["-p", "scale=3.0"]),
    ],
)
def test_show_draws_each_methods_state(
    tiny_llava: Path, tmp_path: Path, method: str, params: list[str]
) -> None:
    from steer import zoo

    image = tmp_path / "in.png"
    zoo.sample_image(0, (64, 64)).save(image)
    out = tmp_path / f"{method}.png"
    result = CliRunner().invoke(
        app,
        ["show", "--model", str(tiny_llava), "--image", str(image), "--method", method, *params,
         "--max-new-tokens", "3", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"with {method}:" in result.stdout
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width >= 320 and picture.height >= 300


def test_show_as_a_python_call_and_its_errors(tiny_llava: Path, tmp_path: Path) -> None:
    from steer import zoo
    from steer.evals.loading import load_model
    from steer.evals.show import draw, show

    loaded = load_model(str(tiny_llava))
    shown = show(
        loaded, zoo.sample_image(1, (64, 64)), "fastervlm", params={"reduction": 0.5}, max_new_tokens=2
    )
    assert shown.state["samples"][0][0]["T"] == 8 and shown.path is None  # 16 tokens, half kept
    assert set(shown.answers) == {"without", "with"} and shown.picture.width >= 320
    # the same picture from a state the caller already has, without running anything
    again = draw("fastervlm", shown.state, zoo.sample_image(1, (64, 64)))
    assert again.height >= 300
    with pytest.raises(errors.EvalInputError, match="needs the attention rows"):
        draw("image_attention", {}, zoo.sample_image(1))
    with pytest.raises(errors.EvalInputError, match="no picture for this method"):
        draw("pai", {}, zoo.sample_image(1))
    runner = CliRunner()
    missing = runner.invoke(
        app, ["show", "--model", str(tiny_llava), "--image", str(tmp_path / "x.png"), "--method", "vhr"]
    )
    assert missing.exit_code == 2 and missing.output.count("\n") == 1 and "file not found" in missing.output
    (tmp_path / "in.png").write_bytes(b"")
    zoo.sample_image(0).save(tmp_path / "in.png")
    bad = runner.invoke(
        app,
        [
            "show",
            "--model",
            str(tiny_llava),
            "--image",
            str(tmp_path / "in.png"),
            "--method",
            "vhr",
            "-p",
            "alpha=-1",
        ],
    )
    assert bad.exit_code == 2 and "alpha" in bad.output and "Traceback" not in bad.output


def test_show_attention_rows_before_and_after(tiny_llava: Path) -> None:
    """The edited-probabilities site by hand: image_attention at scale s turns each edited row's image
    probabilities p_j into s p_j / (s m + 1 - m) (m: the row's image mass), layer by layer and head by head;
    show's rows are their mean over layers and heads, before (plain model) and after."""
    import torch

    import steer
    from steer import edits, zoo
    from steer.evals.loading import load_model
    from steer.evals.show import image_attention_row

    loaded = load_model(str(tiny_llava))
    processor, model = loaded.processor, loaded.model
    inputs = processor(
        text=["USER: <image>\nDescribe. ASSISTANT:"], images=[zoo.sample_image(2, (64, 64))], return_tensors="pt"
    )
    image = inputs["input_ids"][0] == model.config.image_token_id
    positions = image.nonzero().flatten().tolist()
    seen: dict[str, dict[int, torch.Tensor]] = {"plain": {}, "edited": {}}

    def keep(kind: str) -> Any:
        def fn(probs: torch.Tensor, ectx: Any) -> None:
            seen[kind][ectx.layer] = probs[0, :, -1].clone()  # [H, Lk]: the last prompt row
            return None

        return fn

    collects = [
        edits.Collect(name="plain", site="layer.attn.probs", phase="prefill", fn=keep("plain")),
        edits.Collect(name="edited", site="layer.attn.probs.edited", phase="prefill", fn=keep("edited")),
    ]
    s = 3.0
    with steer.apply(model, "image_attention", scale=s), steer.apply(model, collects), torch.no_grad():
        model(**inputs)
    assert set(seen["plain"]) == set(seen["edited"]) == set(range(model.config.text_config.num_hidden_layers))
    for layer, p in seen["plain"].items():
        m = p[:, image].sum(-1, keepdim=True)
        expected = torch.where(image, s * p, p) / (s * m + 1 - m)
        assert torch.allclose(seen["edited"][layer], expected, atol=1e-6)
    mean_after = torch.stack([seen["edited"][k] for k in sorted(seen["edited"])]).mean((0, 1))
    with steer.apply(model, collects[:1]), torch.no_grad():  # the plain model's rows (earlier layers unedited)
        model(**inputs)
    mean_before = torch.stack([seen["plain"][k] for k in sorted(seen["plain"])]).mean((0, 1))
    before = image_attention_row(model, inputs, positions)
    after = image_attention_row(model, inputs, positions, {"image_attention": {"scale": s}})
    assert torch.allclose(torch.tensor(before), mean_before[image], atol=1e-6)
    assert torch.allclose(torch.tensor(after), mean_after[image], atol=1e-6)
    assert sum(after) > sum(before)
