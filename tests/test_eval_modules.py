"""The parts of a `steer eval` run one by one (journal, settings, sharding, prompts, options, tasks), no model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from steer import errors, protocols
from steer.evals import builtin, chair, generation, journal, prompts, settings, sharding
from steer.evals.options import RunOptions, check_choice, default_out, method_params
from steer.evals.tasks import ChairTask, PopeTask, Sample


def write_lines(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# errors and protocols
# --------------------------------------------------------------------------------------------------


def test_eval_input_error_is_one_class_reexported() -> None:
    import steer.evals

    assert chair.EvalInputError is errors.EvalInputError is steer.evals.EvalInputError
    assert issubclass(errors.EvalInputError, errors.SteerError)
    assert issubclass(errors.EvalInputError, ValueError)
    assert issubclass(settings.SettingsMismatchError, errors.EvalInputError)


def test_prompts_reexport_the_protocol_texts() -> None:
    assert prompts.CHAIR_PROMPT is protocols.CHAIR_PROMPT == "Please describe this image in detail."
    assert prompts.POPE_PROMPTS is protocols.POPE_PROMPTS
    assert set(protocols.POPE_PROMPTS) == {"llava", "vcd", "raw"}


# --------------------------------------------------------------------------------------------------
# journal
# --------------------------------------------------------------------------------------------------


def test_read_samples_ignores_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    write_lines(path, [{"key": "a"}, {"key": "b"}], tail='{"key": "c", "capt')
    records, good = journal.read_samples(path)
    assert [r["key"] for r in records] == ["a", "b"]
    assert good == len(path.read_bytes()) - len('{"key": "c", "capt')
    write_lines(path, [{"key": "a"}], tail='{"key": "b", "x"\n')  # an unparsable complete last line
    assert [r["key"] for r in journal.read_samples(path)[0]] == ["a"]


def test_read_samples_refuses_damage_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(errors.EvalInputError, match=":2: malformed sample line"):
        journal.read_samples(path)
    path.write_text('{"key": "a"}\n[1, 2]\n')
    with pytest.raises(errors.EvalInputError, match=":2: not a sample record"):
        journal.read_samples(path)


def test_writer_repairs_then_appends(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    write_lines(path, [{"key": "a"}], tail='{"key": "b", "cap')
    writer = journal.SampleWriter(path)
    writer.write([{"key": "b", "caption": "été"}])
    writer.close()
    assert path.read_text(encoding="utf-8") == '{"key": "a"}\n{"key": "b", "caption": "été"}\n'


def test_shard_files_and_records(tmp_path: Path) -> None:
    assert journal.shard_path(tmp_path, 0, 1) == tmp_path / "samples.jsonl"
    assert journal.shard_path(tmp_path, 3, 4) == tmp_path / "samples.rank3.jsonl"
    assert not journal.has_records(tmp_path)
    write_lines(tmp_path / "samples.rank10.jsonl", [{"key": "z"}])
    write_lines(tmp_path / "samples.rank2.jsonl", [{"key": "a", "error": "bad"}, {"key": "b", "v": 1}])
    write_lines(tmp_path / "samples.jsonl", [{"key": "a", "v": 1}, {"key": "b", "error": "bad"}])
    names = [p.name for p in journal.sample_files(tmp_path)]
    assert names == ["samples.jsonl", "samples.rank2.jsonl", "samples.rank10.jsonl"]
    records = journal.load_records(tmp_path)
    # a success beats an error whichever file comes first
    assert records["a"] == {"key": "a", "v": 1} and records["b"] == {"key": "b", "v": 1}
    assert journal.has_records(tmp_path)


def test_merge_orders_by_the_given_keys_and_removes_shards(tmp_path: Path) -> None:
    write_lines(tmp_path / "samples.rank1.jsonl", [{"key": "b"}, {"key": "extra"}])
    write_lines(tmp_path / "samples.rank0.jsonl", [{"key": "c"}, {"key": "a"}])
    merged = journal.merge_samples(tmp_path, ["a", "b", "c", "missing"])
    assert [r["key"] for r in merged] == ["a", "b", "c", "extra"]
    assert [p.name for p in journal.sample_files(tmp_path)] == ["samples.jsonl"]
    before = (tmp_path / "samples.jsonl").read_bytes()
    assert journal.merge_samples(tmp_path, ["a", "b", "c"]) == merged  # again: harmless
    assert (tmp_path / "samples.jsonl").read_bytes() == before


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------


def test_flatten_nests_with_dots() -> None:
    assert settings.flatten({"b": {"y": 1, "x": {}}, "a": [1]}) == {"a": [1], "b.x": {}, "b.y": 1}


def test_settings_file_checks(tmp_path: Path) -> None:
    s = settings.EvalSettings(task="pope", model="m", methods=["var"], recipe="vhr")
    assert s.method_label == "recipe:vhr+var"
    assert settings.EvalSettings(task="pope", model="m").method_label == "baseline"
    assert s.generation_kwargs == {"max_new_tokens": 512, "do_sample": False, "num_beams": 1}
    assert settings.read_settings(tmp_path) is None
    write_lines(tmp_path / "samples.jsonl", [{"key": "1"}])
    with pytest.raises(settings.SettingsMismatchError, match="holds samples but no settings.json"):
        settings.check_settings(tmp_path, s)
    (tmp_path / "samples.jsonl").unlink()
    assert settings.check_settings(tmp_path, s) is False
    settings.record_resolved(tmp_path, {"family": "llava-1.5"})
    settings.record_resolved(tmp_path, {"family": "other"})  # recorded once
    saved = settings.read_settings(tmp_path)
    assert saved is not None and saved["resolved"] == {"family": "llava-1.5"}
    assert saved["hash"] == s.stable_hash() and saved["settings"]["methods"] == ["var"]
    (tmp_path / "settings.json").write_text("[]")
    with pytest.raises(errors.EvalInputError, match="not a steer eval settings file"):
        settings.read_settings(tmp_path)


# --------------------------------------------------------------------------------------------------
# sharding and generation helpers
# --------------------------------------------------------------------------------------------------


def test_shard_of_takes_every_nth() -> None:
    items = list(range(7))
    assert [sharding.shard_of(items, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert sharding.shard_of(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank 3 is not in"):
        sharding.shard_of(items, 3, 3)


def test_single_process_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert sharding.distributed_context() == (0, 1, None)
    assert sharding.process_device_map("cpu", 1, None) == "cpu"
    assert sharding.process_device_map(None, 1, None) is None


def test_count_tokens_stops_at_the_first_stop_token() -> None:
    assert generation.count_tokens([5, 6, 2, 0, 0], {2, 0}) == 2
    assert generation.count_tokens([5, 6], {2}) == 2


# --------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------


class ChatProcessor:
    chat_template = "x"

    def apply_chat_template(self, messages: list[Any], **kwargs: Any) -> str:
        return f"<chat>{messages[0]['content'][1]['text']}"


def test_templates() -> None:
    assert prompts.resolve_template("auto", "llava", None) == "llava_v1"
    assert prompts.resolve_template("auto", "qwen2_vl", ChatProcessor()) == "chat"
    assert prompts.resolve_template("auto", "qwen2_vl", object()) == "plain"
    with pytest.raises(errors.EvalInputError, match="unknown --template"):
        prompts.resolve_template("vicuna", "llava", None)
    with pytest.raises(errors.EvalInputError, match="this model is qwen2_vl"):
        prompts.resolve_template("llava_v1", "qwen2_vl", None)
    with pytest.raises(errors.EvalInputError, match="no chat template"):
        prompts.resolve_template("chat", "llava", object())
    built = prompts.build_prompt("Hi?", "llava_v1", "llava", None)
    assert built == f"{prompts.LLAVA_V1_SYSTEM} USER: <image>\nHi? ASSISTANT:"
    assert prompts.build_prompt("Hi?", "chat", "qwen2_vl", ChatProcessor()) == "<chat>Hi?"
    with pytest.raises(errors.EvalInputError, match="no plain prompt format"):
        prompts.build_prompt("Hi?", "plain", "idefics3", None)


# --------------------------------------------------------------------------------------------------
# options -> settings
# --------------------------------------------------------------------------------------------------


def test_run_options_from_a_commands_values(tmp_path: Path) -> None:
    options = RunOptions.from_values(
        {"model": "m", "images": tmp_path, "method": ["var", "var"], "prompt": "x"}
    )
    assert options.methods == ["var"] and options.num_images == 500
    with pytest.raises(errors.EvalInputError, match="--images is required"):
        RunOptions(model="m").with_defaults("chair")
    filled, bench = options.with_defaults("chair")
    assert bench is None and (filled.max_new_tokens, filled.batch_size, filled.template) == (512, 1, "auto")
    assert RunOptions(model="m", images=tmp_path, batch_size=4).with_defaults("pope")[0].batch_size == 4
    assert RunOptions(model="m", images=tmp_path).with_defaults("pope")[0].max_new_tokens == 128


def test_builtin_defaults_do_not_write_the_split_when_images_are_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> Any:
        raise AssertionError("the split was materialised")

    monkeypatch.setattr(builtin, "split", fail)
    filled, bench = RunOptions(model="builtin:demo", images=tmp_path).with_defaults("chair")
    assert bench is not None and (filled.max_new_tokens, filled.batch_size, filled.template) == (
        64,
        16,
        "plain",
    )
    filled, _ = RunOptions(model="builtin:demo", images=tmp_path, template="chat").with_defaults("pope")
    assert (filled.max_new_tokens, filled.template) == (16, "chat")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
        ({"num_beams": 0}, "--num-beams must be >= 1"),
        ({"dtype": "float8"}, "unknown --dtype 'float8'"),
        ({"template": "vicuna"}, "unknown --template 'vicuna'"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "not both"),
    ],
)
def test_run_options_check(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    options, _ = RunOptions(model="m", images=tmp_path, **change).with_defaults("chair")
    with pytest.raises(errors.EvalInputError, match=message):
        options.check()


def test_settings_are_built_once_from_the_options(tmp_path: Path) -> None:
    options, _ = RunOptions(
        model="m",
        images=tmp_path,
        method=["var", "vhr", "var"],
        param=["var.p=0.5", "scale=2", "name=abc"],
        load_in_8bit=True,
        batch_size=3,
    ).with_defaults("pope")
    s = options.settings("pope", {"n": 1}, "{question}", {"": "cuda:1"})
    assert (s.task, s.model, s.methods, s.quantization) == ("pope", "m", ["var", "vhr"], "8bit")
    assert s.params == {"var": {"p": 0.5}, "scale": 2, "name": "abc"}
    assert (s.max_new_tokens, s.batch_size, s.selection, s.prompt) == (128, 3, {"n": 1}, "{question}")
    assert s.device_map == "{'': 'cuda:1'}" and s.images == str(tmp_path.resolve())
    out = default_out(s)
    assert (
        out.parent == Path("runs") and out.name == f"pope-m-var-vhr-{s.stable_hash()[:8]}"
    )  # "+" is not kept
    with pytest.raises(errors.EvalInputError, match="--param expects NAME=VALUE"):
        method_params(["oops"], [])
    assert check_choice("keep", ("keep", "last"), "--duplicates") == "keep"
    with pytest.raises(errors.EvalInputError, match="unknown --duplicates 'x'; expected one of keep, last"):
        check_choice("x", ("keep", "last"), "--duplicates")


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------


def test_task_records() -> None:
    sample = Sample(key="7", image_path=Path("a/COCO_7.jpg"), text="t", fields={"image_id": 7})
    gt = chair.GroundTruth({}, "x", "md5")
    task = ChairTask([sample], {}, gt)
    assert task.record(sample, "A cat.", 3, None) == {
        "key": "7",
        "image_id": 7,
        "caption": "A cat.",
        "n_generated_tokens": 3,
    }
    assert task.record(sample, None, None, "unreadable") == {
        "key": "7",
        "image_id": 7,
        "caption": None,
        "error": "unreadable",
    }
    assert PopeTask([sample], {}, {}).record(sample, "yes", 1, None)["answer"] == "yes"


def test_shipped_data_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from steer.evals.tasks import chair as chair_task_module
    from steer.evals.tasks import pope as pope_task_module

    ids = chair_task_module.opera500_ids()
    assert ids is not None and len(ids) == 500 == len(set(ids))
    monkeypatch.delenv("STEER_POPE_DIR", raising=False)
    found = pope_task_module.find_questions("random", "2023-08", None)
    assert found.name == "coco_pope_random_2023-08.json.gz" and found.parent.name == "data"
    with pytest.raises(errors.EvalInputError, match="no POPE question file coco_pope_random.json"):
        pope_task_module.find_questions("random", "current", Path("/nonexistent"))


def test_an_image_folder_without_ids_names_the_split_in_use(tmp_path: Path) -> None:
    """The error says what the folder holds and how files must be named for the ground truth in use."""
    from steer.errors import EvalInputError
    from steer.evals.tasks.chair import chair_task

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"")
    with pytest.raises(EvalInputError, match=r"holds 1 image files \(cat.jpg\).*COCO_val2014_\d{12}\.jpg"):
        chair_task(folder)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"7": ["dog"], "12": ["cat"]}))
    with pytest.raises(EvalInputError, match=r"ground truth in use \(.*gt.json\).*image_7.png, image_12.png") as err:
        chair_task(folder, gt_objects=gt)
    assert "COCO" not in str(err.value)
