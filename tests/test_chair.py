"""CHAIR scorer: the LLaVA-1.5 anchor, the caption rules of the spec, ground-truth building and the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steer.evals import chair
from steer.evals.cli import chair_app

DATA = Path(__file__).parent / "data"
CAPTIONS = DATA / "llava15_7b_greedy_512_opera.jsonl"
GT_500 = DATA / "chair_gt_opera500.json"


def nodes(caption: str) -> list[str]:
    return list(chair.caption_mentions(caption).nodes)


def words(caption: str) -> list[str]:
    return list(chair.caption_mentions(caption).words)


@pytest.fixture(scope="module")
def anchor() -> dict:
    return chair.score_captions(chair.load_captions(CAPTIONS), chair.load_gt(GT_500))


# ---------------------------------------------------------------------------------------------- anchor


def test_anchor_counts_exact(anchor: dict) -> None:
    counts = anchor["overall"]["counts"]
    assert counts == {
        "captions": 500,
        "hallucinated_captions": 225,
        "mentions": 3739,
        "hallucinated_mentions": 478,
        "gt_objects": 1524,
        "recalled": 1216,
        "tokens": 48444,
    }


def test_anchor_rounded_metrics(anchor: dict) -> None:
    overall = anchor["overall"]
    assert round(100 * overall["CHAIR_s"], 1) == 45.0
    assert round(100 * overall["CHAIR_i"], 1) == 12.8
    assert round(100 * overall["Recall"], 1) == 79.8
    assert round(overall["Len"], 1) == 96.9
    assert overall["Precision"] == pytest.approx(1216 / 1596)


def test_anchor_records(anchor: dict) -> None:
    records = anchor["captions"]
    assert [r["image_id"] for r in records[:3]] == [226988, 337443, 112022]
    assert sum(r["chair_s"] for r in records) == 225
    assert sum(len(r["hallucinated"]) for r in records) == 478
    first = records[0]
    assert {m["node"] for m in first["mentions"]} == {
        "person",
        "dining table",
        "pizza",
        "bench",
        "chair",
        "bottle",
    }
    assert [m["word"] for m in first["mentions"]] == [
        "woman",
        "table",
        "pizza",
        "pizza",
        "person",
        "table",
        "bench",
        "chair",
        "table",
        "bottle",
        "table",
    ]
    assert [m["word"] for m in first["hallucinated"]] == ["bench", "chair", "bottle"]
    assert first["gt"] == ["dining table", "person", "pizza"]
    assert (first["chair_s"], first["recalled"], first["n_tokens"]) == (1, 3, 106)
    assert sum(r["n_tokens"] for r in records) == 48444
    assert anchor["config"]["synonyms_md5"] == "fdf03d16beb2507696d1b881c958904d"


def test_sentence_split_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without step 2 the scorer lands on 43.8 / 12.7, which must not be what ships."""
    monkeypatch.setattr(chair, "_SENTENCE_END", re.compile(r"(?!x)x"))
    result = chair.score_captions(chair.load_captions(CAPTIONS), chair.load_gt(GT_500))
    assert round(100 * result["overall"]["CHAIR_s"], 1) == 43.8
    assert round(100 * result["overall"]["CHAIR_i"], 1) == 12.7


# ---------------------------------------------------------------------------------------------- data


def test_shipped_data_is_byte_exact() -> None:
    import importlib.resources

    root = importlib.resources.files("steer.evals").joinpath("data")
    assert (
        hashlib.md5(root.joinpath("synonyms.txt").read_bytes()).hexdigest()
        == "fdf03d16beb2507696d1b881c958904d"
    )
    gt = chair.load_gt()
    assert gt.md5 == "441a5b50ece77c723effad9ec6385b74"
    assert len(gt) == 123287
    subset = chair.load_gt(GT_500).objects
    assert len(subset) == 500
    assert all(gt.objects[k] == v for k, v in subset.items())


def test_synonym_parsing() -> None:
    vocab = chair.load_vocabulary()
    assert len(vocab.to_node) == 403
    assert len(vocab.nodes) == 80
    assert vocab.nodes[0] == "person" and vocab.nodes[-1] == "toothbrush"
    for odd in (" motor bike", " cheesecake", "iPhone", "knive", "phon"):
        assert odd in vocab
    assert vocab.to_node["monitor"] == "tv"
    assert vocab.to_node["seat"] == "chair"
    assert "men" not in vocab and "surfer" not in vocab
    assert len(chair.MERGE_TABLE) == 55


def test_parse_synonyms_keeps_entries_verbatim() -> None:
    vocab = chair.parse_synonyms("dog, puppy,  doggo\n\ncat, Kitty\n")
    assert dict(vocab.to_node) == {
        "dog": "dog",
        "puppy": "dog",
        " doggo": "dog",
        "cat": "cat",
        "Kitty": "cat",
    }
    assert vocab.nodes == ("dog", "cat")


# ---------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("word", "singular"),
    [
        ("bus", "bu"),
        ("buses", "bus"),
        ("minibus", "minibu"),
        ("glass", "glas"),
        ("glasses", "glass"),
        ("ties", "ty"),
        ("men", "man"),
        ("women", "woman"),
        ("people", "person"),
        ("children", "child"),
        ("knives", "knife"),
        ("mice", "mouse"),
        ("oxen", "ox"),
        ("geese", "goose"),
        ("skis", "ski"),
        ("hairdryers", "hairdryer"),
        ("teddybears", "teddybear"),
        ("was", "wa"),
        ("dogs", "dog"),
        ("airbuses", "airbus"),
        ("collies", "collies"),
        ("doggies", "doggies"),
        ("phones", "phone"),
        ("benches", "bench"),
        ("sheep", "sheep"),
        ("mothers-in-law", "mother-in-law"),
        ("dogs'", "dog's"),
        ("wolves", "wolf"),
        ("potatoes", "potato"),
        ("data", "datum"),
        ("cacti", "cactus"),
        ("boxes", "box"),
    ],
)
def test_singularize(word: str, singular: str) -> None:
    assert chair.singularize(word) == singular


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A bus is parked by the road.", []),
        ("Two buses are parked by the road.", ["bus"]),
        ("An airbus and a minibus.", []),
        ("Three men and two women.", ["person", "person"]),
        ("The train tracks are empty.", []),
        ("A passenger train arrives.", ["train"]),
        ("Passengers wait.", ["person"]),
        ("A baby zebra grazes.", ["zebra"]),
        ("An adult cub.", []),
        ("A baby sleeps.", ["person"]),
        ("A toilet with the seat up next to a chair.", ["toilet", "chair"]),
        ("A toilet seat.", ["toilet"]),
        ("A chair with a seat.", ["chair", "chair"]),
        ("A red motor bike.", []),
        ("A motorbike.", ["motorcycle"]),
        ("A stove top oven.", ["oven", "oven"]),
        ("Two wine glasses.", ["wine glass"]),
        ("A glass of water.", []),
        ("Hot dogs and teddy bears.", ["hot dog", "teddy bear"]),
        ("A hot-dog and a t-shirt.", []),
        ("A dog, another dog and a third dog.", ["dog", "dog", "dog"]),
        ("A dining table.", ["dining table"]),
        ("The man's iphone and a cheesecake.", ["person"]),
        ("A bow tie and two ties.", ["tie"]),
        ("A dog. A cat!", ["dog", "cat"]),
        ("A computer monitor on a desk", ["laptop", "tv", "dining table"]),
        ("A jet. An airplane.", ["airplane", "airplane"]),
        ("Home plate.", []),
        ("", []),
    ],
)
def test_caption_rules(caption: str, expected: list[str]) -> None:
    assert nodes(caption) == expected


def test_mention_words_and_tokens() -> None:
    found = chair.caption_mentions("Two wine glasses. Three men.")
    assert found.words == ("wine glass", "man")
    assert found.nodes == ("wine glass", "person")
    # two, wine glass, ., three, man, .  -> six tokens after the merge, punctuation included
    assert found.n_tokens == 6
    assert chair.caption_tokens("A dog. A cat.") == ["a", "dog", ".", "a", "cat", "."]
    # without the sentence split the period would stay glued to "dog"
    assert "dog." not in chair.caption_tokens("A dog. A cat.")


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_by_hand() -> None:
    gt = {1: {"dog", "person"}, 2: {"cat"}, 3: {"car", "bus"}}
    captions = [
        {
            "image_id": 1,
            "caption": "A man with a dog and a dog and a cat.",
        },  # 4 mentions, 1 hallucinated (cat)
        {"image_id": 2, "caption": "A cat on a sofa."},  # cat ok, couch hallucinated
        {"image_id": 3, "caption": "Nothing to see here."},  # no mentions
    ]
    result = chair.score_captions(captions, gt)
    overall = result["overall"]
    assert overall["counts"]["captions"] == 3
    assert overall["CHAIR_s"] == pytest.approx(2 / 3)  # the empty caption is in the denominator only
    assert overall["CHAIR_i"] == pytest.approx(2 / 6)
    assert overall["Recall"] == pytest.approx((2 + 1 + 0) / (2 + 1 + 2))
    assert overall["Precision"] == pytest.approx(3 / 5)
    assert overall["Len"] == pytest.approx((12 + 6 + 5) / 3)
    first, second, third = result["captions"]
    assert first["hallucinated"] == [{"word": "cat", "node": "cat"}]
    assert first["chair_i"] == pytest.approx(0.25) and first["recalled"] == 2
    assert second["hallucinated"] == [{"word": "sofa", "node": "couch"}]
    assert third["chair_s"] == 0 and third["chair_i"] == 0 and third["mentions"] == []


def test_missing_gt_raises_or_counts_as_empty() -> None:
    captions = [{"image_id": 7, "caption": "A dog."}, {"image_id": 8, "caption": "A dog."}]
    with pytest.raises(chair.EvalInputError, match="1 image ids are not in the ground truth"):
        chair.score_captions(captions, {7: {"dog"}})
    result = chair.score_captions(captions, {7: {"dog"}}, missing_gt="empty")
    assert result["overall"]["CHAIR_s"] == 0.5
    assert result["config"]["missing_gt_ids"] == [8]


def test_duplicates_keep_and_last() -> None:
    captions = [
        {"image_id": 1, "caption": "A cat."},
        {"image_id": 2, "caption": "A dog."},
        {"image_id": 1, "caption": "A dog."},
    ]
    gt = {1: {"dog"}, 2: {"dog"}}
    with pytest.warns(UserWarning, match="1 image ids have several captions"):
        kept = chair.score_captions(captions, gt)
    assert kept["overall"]["counts"]["captions"] == 3
    assert kept["overall"]["CHAIR_s"] == pytest.approx(1 / 3)
    last = chair.score_captions(captions, gt, duplicates="last")
    assert [(r["image_id"], r["caption"]) for r in last["captions"]] == [(1, "A dog."), (2, "A dog.")]
    assert last["overall"]["CHAIR_s"] == 0
    with pytest.raises(chair.EvalInputError, match="duplicates"):
        chair.score_captions(captions, gt, duplicates="first")


def test_truncate_incomplete() -> None:
    gt = {1: {"dog"}}
    captions = [{"image_id": 1, "caption": "A dog on grass. Behind it a cat and a"}]
    assert chair.score_captions(captions, gt)["overall"]["CHAIR_s"] == 1
    cut = chair.score_captions(captions, gt, truncate_incomplete=True)
    assert cut["captions"][0]["caption"] == "A dog on grass."
    assert cut["overall"]["CHAIR_s"] == 0
    whole = [{"image_id": 1, "caption": "A dog and a cat"}]  # no period: unchanged
    assert chair.score_captions(whole, gt, truncate_incomplete=True)["overall"]["CHAIR_s"] == 1


def test_opera_lineage_reports_missing_nltk_data(monkeypatch: pytest.MonkeyPatch) -> None:
    import nltk

    def not_found(resource: str, *args: object, **kwargs: object) -> None:
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", not_found)
    chair._opera_lemmatizer.cache_clear()
    try:
        with pytest.raises(chair.EvalInputError, match="averaged_perceptron_tagger_eng"):
            chair.score_captions([{"image_id": 1, "caption": "A dog."}], {1: {"dog"}}, lineage="opera")
    finally:
        chair._opera_lemmatizer.cache_clear()
    with pytest.raises(chair.EvalInputError, match="lineage"):
        chair.score_captions([], {}, lineage="nltk")


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (123456, 123456),
        ("123456", 123456),
        ("COCO_val2014_000000123456.jpg", 123456),
        ("/data/val2014/COCO_val2014_000000000042.jpg", 42),
    ],
)
def test_parse_image_id(value: object, expected: int) -> None:
    assert chair.parse_image_id(value) == expected


@pytest.mark.parametrize("value", ["dog", True, None, 1.5])
def test_parse_image_id_rejects(value: object) -> None:
    with pytest.raises(chair.EvalInputError):
        chair.parse_image_id(value)


def test_load_captions_formats(tmp_path: Path) -> None:
    array = tmp_path / "caps.json"
    array.write_text(json.dumps([{"image": "COCO_val2014_000000000009.jpg", "text": "A dog."}]))
    assert chair.load_captions(array, image_key="image", caption_key="text") == [
        {"image_id": 9, "caption": "A dog."}
    ]
    lines = tmp_path / "caps.jsonl"
    lines.write_text('{"image_id": 1, "caption": "a"}\n\n{"image_id": "2", "caption": "b"}\n')
    assert [c["image_id"] for c in chair.load_captions(lines)] == [1, 2]
    lines.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": \n')
    with pytest.raises(chair.EvalInputError, match=r"caps.jsonl:2: malformed JSON line"):
        chair.load_captions(lines)
    with pytest.raises(chair.EvalInputError, match="file not found"):
        chair.load_captions(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------- ground truth from COCO

# Images with their shipped GT split between human captions and instance annotations (the union is the shipped
# set; the objects marked "caption only" can only come from the captions). A second caption per image holds words
# that must NOT add objects: singular bus, train tracks, motor bike, hot-dog.
GT_IMAGES = {
    226988: (
        "A woman takes a picture of a pizza at the table.",
        ["pizza"],
    ),  # caption only: person, dining table
    337443: (
        "An orange sign; cars and a truck drive by two people.",
        ["backpack", "car"],
    ),  # orange, truck, person
    112022: ("People wait for suitcases at the airport.", ["backpack", "handbag", "person"]),  # suitcase
    395801: (
        "A man and a dog sit on a bench under a clock.",
        ["car", "handbag"],
    ),  # person, dog, bench, clock
}
NOISE = "A bus near the train tracks, a motor bike and a hot-dog stand."


def _write_coco(folder: Path) -> None:
    vocab = chair.load_vocabulary()
    categories = [{"id": 100 + i, "name": name, "supercategory": "x"} for i, name in enumerate(vocab.nodes)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in [*GT_IMAGES, 999999]]
    instances, captions = [], []
    for image_id, (caption, names) in GT_IMAGES.items():
        for name in names:
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": cat_id[name]})
        for text in (caption, NOISE):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    (folder / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": categories})
    )
    (folder / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}))


def test_build_gt_from_coco_matches_shipped(tmp_path: Path) -> None:
    shipped = chair.load_gt()
    _write_coco(tmp_path)
    built = chair.build_gt_from_coco(tmp_path)
    assert set(built.objects) == {*GT_IMAGES, 999999}
    for image_id, (_, names) in GT_IMAGES.items():
        assert built.objects[image_id] == shipped.objects[image_id]
        assert built.objects[image_id] - set(names)  # the captions contributed objects
    assert built.objects[999999] == frozenset()  # a listed image without annotations
    assert chair.compare_gt(built) == [999999]  # not an image of the shipped map
    assert list(chair.build_gt_from_coco(tmp_path, image_ids=[226988]).objects) == [226988]
    # instances alone, or captions alone, are not enough
    (tmp_path / "captions_val2014.json").rename(tmp_path / "captions.bak")
    assert chair.build_gt_from_coco(tmp_path).objects[226988] == {"pizza"}
    (tmp_path / "captions.bak").rename(tmp_path / "captions_val2014.json")
    (tmp_path / "instances_val2014.json").unlink()
    assert chair.build_gt_from_coco(tmp_path).objects[337443] == {"orange", "car", "truck", "person"}


def test_build_gt_errors(tmp_path: Path) -> None:
    with pytest.raises(chair.EvalInputError, match="no instances_"):
        chair.build_gt_from_coco(tmp_path)
    (tmp_path / "instances_val2014.json").write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [{"image_id": 1, "category_id": 5}],
                "categories": [{"id": 5, "name": "unicorn"}],
            }
        )
    )
    with pytest.raises(chair.EvalInputError, match="'unicorn'"):
        chair.build_gt_from_coco(tmp_path)
    (tmp_path / "instances_val2014.json").unlink()
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(chair.EvalInputError, match=r"malformed COCO annotation \(KeyError: 'caption'\)"):
        chair.build_gt_from_coco(tmp_path)


def test_save_gt_round_trip(tmp_path: Path) -> None:
    gt = chair.load_gt(GT_500)
    md5 = chair.save_gt(gt, tmp_path / "gt.json.gz")
    assert md5 == hashlib.md5((tmp_path / "gt.json.gz").read_bytes()).hexdigest()
    data = json.loads(gzip.decompress((tmp_path / "gt.json.gz").read_bytes()))
    assert len(data) == 500 and all(v == sorted(v) for v in data.values())
    assert chair.load_gt(tmp_path / "gt.json.gz").objects == gt.objects


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_score_json_is_one_object(tmp_path: Path) -> None:
    captions = tmp_path / "caps.jsonl"
    captions.write_bytes(CAPTIONS.read_bytes())
    result = CliRunner().invoke(
        chair_app, ["score", "--captions", str(captions), "--gt-objects", str(GT_500), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    payload = json.loads(result.stdout)
    assert (payload["CHAIR_s"], payload["CHAIR_i"], payload["Recall"], payload["Len"]) == (
        45.0,
        12.8,
        79.8,
        96.9,
    )
    assert payload["hallucinated_mentions"] == 478 and payload["mentions"] == 3739
    records = (tmp_path / "caps.chair.jsonl").read_text().splitlines()
    assert len(records) == 500
    assert json.loads(records[0])["image_id"] == 226988
    summary = json.loads((tmp_path / "caps.chair.summary.json").read_text())
    assert summary["overall"]["counts"]["hallucinated_captions"] == 225


def test_cli_default_gt_and_table(tmp_path: Path) -> None:
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 226988, "caption": "A woman and a giraffe."}\n')
    out = tmp_path / "records.jsonl"
    result = CliRunner().invoke(chair_app, ["score", "--captions", str(captions), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "CHAIR_s" in result.stdout and "100.0" in result.stdout
    record = json.loads(out.read_text())
    assert record["hallucinated"] == [{"word": "giraffe", "node": "giraffe"}]


def test_cli_coco_annotations_and_build_gt(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 337443, "caption": "Cars, a truck and a dog."}\n')
    runner = CliRunner()
    result = runner.invoke(
        chair_app, ["score", "--captions", str(captions), "--coco-annotations", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["CHAIR_i"] == pytest.approx(100 / 3, abs=0.05)
    built = runner.invoke(
        chair_app, ["build-gt", "--coco-annotations", str(tmp_path), "--out", str(tmp_path / "gt.json.gz")]
    )
    assert built.exit_code == 0, built.output
    assert "wrote 5 images" in built.stdout and "1 differ from the shipped map: 999999" in built.stdout
    assert chair.load_gt(tmp_path / "gt.json.gz").objects[337443] == chair.load_gt().objects[337443]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "captions file not found"),
        ('{"image_id": 1, "caption": "a"}\n{oops}\n', [], "caps.jsonl:2: malformed JSON line"),
        (
            '{"image_id": 1, "caption": "a"}\n',
            ["--gt-objects", "missing.json"],
            "ground-truth file not found",
        ),
        ('{"image_id": 1, "caption": "a"}\n', ["--duplicates", "first"], "unknown --duplicates 'first'"),
        (
            '{"image_id": 1, "caption": "a"}\n',
            ["--gt-objects", str(GT_500)],
            "1 image ids are not in the ground truth",
        ),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, content: str | None, extra: list[str], message: str) -> None:
    captions = tmp_path / "caps.jsonl"
    if content is not None:
        captions.write_text(content)
    result = CliRunner().invoke(chair_app, ["score", "--captions", str(captions), *extra])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.output


# ------------------------------------------------- ground truth and synonyms that belong together (issue 17)


def _split(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A small built-in split and captions of its images naming exactly their objects (CHAIR_i 0)."""
    from steer.evals import builtin
    from steer.zoo import synthscenes

    split = builtin.materialize(tmp_path / "split", n_images=6)
    scenes = synthscenes.sample_scenes(builtin.EVAL_SEED, 6)
    captions = tmp_path / "caps.jsonl"
    captions.write_text(
        "".join(
            json.dumps(
                {"image_id": i, "caption": "a scene with " + " and ".join(f"a {k}" for k in s.kinds) + "."}
            )
            + "\n"
            for i, s in enumerate(scenes)
        )
    )
    return split.gt_objects, split.synonyms, captions


def test_builtin_split_ground_truth_brings_its_synonyms(tmp_path: Path) -> None:
    gt, synonyms, captions = _split(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        chair_app, ["score", "--captions", str(captions), "--gt-objects", str(gt), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["CHAIR_i"] == 0.0 and payload["Recall"] == 100.0
    assert "built-in split: its synonym table" in result.stderr
    explicit = runner.invoke(
        chair_app,
        [
            "score",
            "--captions",
            str(captions),
            "--gt-objects",
            str(gt),
            "--synonyms",
            str(synonyms),
            "--json",
        ],
    )
    assert json.loads(explicit.stdout)["CHAIR_i"] == 0.0
    # the same ground truth with COCO's table is refused, not scored as 40% hallucination
    coco = tmp_path / "coco_synonyms.txt"
    coco.write_bytes(importlib_resources_synonyms())
    wrong = runner.invoke(
        chair_app, ["score", "--captions", str(captions), "--gt-objects", str(gt), "--synonyms", str(coco)]
    )
    assert wrong.exit_code == 2 and wrong.stderr.count("\n") == 1
    assert "not in the synonym table" in wrong.stderr and "--synonyms" in wrong.stderr


def importlib_resources_synonyms() -> bytes:
    import importlib.resources

    return importlib.resources.files("steer.evals").joinpath("data", "synonyms.txt").read_bytes()


def test_a_runs_samples_are_scored_with_that_runs_files(tmp_path: Path) -> None:
    from steer.evals.settings import EvalSettings, write_json_atomic

    gt, synonyms, captions = _split(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    samples = run / "samples.jsonl"
    samples.write_text(captions.read_text())
    selection = {"gt_md5": chair.load_gt(gt).md5, "synonyms_md5": chair.load_vocabulary(synonyms).md5}
    settings = EvalSettings(task="chair", model="/somewhere/model", selection=selection)
    write_json_atomic(run / "settings.json", {"hash": settings.stable_hash(), "settings": settings.to_dict()})
    config = {"gt_source": str(gt), "synonyms_source": str(synonyms)}
    write_json_atomic(
        run / "metrics.json",
        {"task": "chair", "settings": settings.to_dict(), "metrics": {}, "details": {"config": config}},
    )
    result = CliRunner().invoke(chair_app, ["score", "--captions", str(samples), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["CHAIR_i"] == 0.0 and "of the steer eval run" in result.stderr
    gt.unlink()  # the run's files are gone: say so instead of scoring against COCO
    gone = CliRunner().invoke(chair_app, ["score", "--captions", str(samples)])
    assert (
        gone.exit_code == 2 and "cannot be found; give --gt-objects FILE and --synonyms FILE" in gone.stderr
    )


def test_empty_captions_are_an_error_not_a_perfect_score(tmp_path: Path) -> None:
    captions = tmp_path / "caps.jsonl"
    captions.write_text("\n")
    result = CliRunner().invoke(chair_app, ["score", "--captions", str(captions)])
    assert result.exit_code == 2 and "no captions" in result.stderr and result.stderr.count("\n") == 1
    with pytest.raises(chair.EvalInputError, match="no captions to score"):
        chair.score_captions([], {1: {"dog"}})


def test_coco_instances_json_as_ground_truth(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    instances = tmp_path / "instances_val2014.json"
    gt = chair.load_gt(instances)  # the file itself, no folder, no conversion step
    assert gt.objects[226988] == {"pizza"} and gt.source == "coco:instances_val2014.json"
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 226988, "caption": "A pizza next to a dog."}\n')
    for option in ("--gt-objects", "--coco-annotations"):
        result = CliRunner().invoke(
            chair_app, ["score", "--captions", str(captions), option, str(instances), "--json"]
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["CHAIR_i"] == 50.0
