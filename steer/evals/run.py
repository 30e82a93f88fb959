"""Generation + scoring in one run: ``steer eval chair|pope``.

A run lives in one folder (``RUN_DIR``):

* ``settings.json``: the run's settings and their stable hash, written before anything is generated
  (`steer.evals.settings`); a later invocation with other settings is refused.
* ``samples.jsonl``: one JSON line per finished sample, appended as soon as its batch is done
  (`steer.evals.journal`). Re-running resumes: samples already on disk are skipped. An unreadable image gives
  a record with an ``error`` field (and no answer) and the run goes on; ``retry_errors`` redoes those.
* Under ``accelerate launch`` (``WORLD_SIZE > 1``) process ``k`` of ``n`` takes its share of the samples
  (`steer.evals.sharding`) and appends to ``samples.rank{k}.jsonl``; after a barrier, process 0 merges every
  sample file into ``samples.jsonl``, removes the shard files, and scores. The merged file is the same as a
  single-process run's.
* ``metrics.json``, ``per_image.json`` and ``report.md`` (`steer.evals.report`), ``report.html``
  (`steer.evals.html_report`): written after scoring.

Nothing is timed or randomised inside a sample record, so records of equal generations are byte-identical
whichever way (batch size, number of processes, interruptions) they were produced. Each batch is seeded from
the run's ``seed`` and its first sample (`steer.evals.generation.batch_seed`): greedy runs do not depend on it;
sampled runs (``do_sample``) reproduce exactly for the same batch size and number of processes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals import generation, html_report, journal, report
from steer.evals.loading import LoadedModel
from steer.evals.prompts import build_prompt
from steer.evals.session import Loader
from steer.evals.settings import EvalSettings, check_settings, read_settings
from steer.evals.sharding import distributed_context, shard_of
from steer.evals.tasks.base import Sample, Task

__all__ = ["GenerationStats", "finish_run", "generate_shard", "run_eval"]


@dataclass
class GenerationStats:
    """What one process did in one invocation."""

    rank: int
    world_size: int
    assigned: int
    already_done: int
    generated: int
    errors: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        """Finished samples (generated or errors) per second of generation."""
        return (self.generated + self.errors) / self.seconds if self.seconds > 0 else 0.0


def _chunks(items: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="sample",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _batch_records(
    task: Task, batch: list[Sample], loaded: LoadedModel, template: str, settings: EvalSettings
) -> list[dict[str, Any]]:
    """The records of one batch in sample order: an unreadable image is that sample's error, not the run's."""
    results: dict[str, dict[str, Any]] = {}
    ready: list[tuple[Sample, Any]] = []
    for sample in batch:
        try:
            ready.append((sample, generation.open_image(sample.image_path)))
        except Exception as err:
            message = f"unreadable image {sample.image_path.name}: {type(err).__name__}: {err}"
            results[sample.key] = task.record(sample, None, None, message)
    if ready:
        prompts = [build_prompt(s.text, template, loaded.model_type, loaded.processor) for s, _ in ready]
        generation.seed_batch(settings.seed, ready[0][0].key)
        outputs = generation.generate_batch(
            loaded, prompts, [image for _, image in ready], settings.generation_kwargs
        )
        for (sample, _), (answer, n_tokens) in zip(ready, outputs):
            results[sample.key] = task.record(sample, answer, n_tokens, None)
    return [results[s.key] for s in batch]


def generate_shard(
    task: Task,
    settings: EvalSettings,
    run_dir: Path,
    load: Loader,
    *,
    rank: int = 0,
    world_size: int = 1,
    retry_errors: bool = False,
    progress: bool = True,
) -> GenerationStats:
    """Generate this process's share of the samples that are not on disk yet, appending each batch at once.

    Process ``rank`` of ``world_size`` owns the samples at positions ``rank, rank + world_size, ...`` of
    ``task.samples``. ``load()`` is called only when there is something to generate; it returns the loaded
    model (with steer methods applied) and a resolved template name as ``(loaded, template)``.
    """
    run_dir = Path(run_dir)
    mine = shard_of(task.samples, rank, world_size)
    done = journal.load_records(run_dir)
    is_done = {s.key for s in mine if s.key in done and not (retry_errors and done[s.key].get("error"))}
    todo = [s for s in mine if s.key not in is_done]
    stats = GenerationStats(rank, world_size, len(mine), len(is_done), 0, 0, 0.0)
    if not todo:
        return stats
    loaded, template = load()
    writer = journal.SampleWriter(journal.shard_path(run_dir, rank, world_size))
    desc = f"{task.name}" + (f" [{rank}/{world_size}]" if world_size > 1 else "")
    bar = _progress_bar(len(mine), len(is_done), desc, progress)
    start = time.perf_counter()
    try:
        for batch in _chunks(todo, max(1, settings.batch_size)):
            records = _batch_records(task, batch, loaded, template, settings)
            writer.write(records)
            failed = sum(1 for r in records if r.get("error"))
            stats.generated += len(batch) - failed
            stats.errors += failed
            bar.update(len(batch))
    finally:
        stats.seconds = time.perf_counter() - start
        bar.close()
        writer.close()
    return stats


def _image_paths(task: Task) -> dict[str, Path]:
    """Each sample's image file by CHAIR image id and by POPE image name (for the HTML gallery)."""
    paths: dict[str, Path] = {}
    for sample in task.samples:
        for field in ("image_id", "image"):
            if field in sample.fields:
                paths[str(sample.fields[field])] = sample.image_path
    return paths


def finish_run(
    task: Task, settings: EvalSettings, run_dir: Path, *, stats: GenerationStats | None = None
) -> dict[str, Any]:
    """Merge the sample files, score, and write ``metrics.json``, ``per_image.json``, ``report.md`` and
    ``report.html`` (process 0 only).

    Raises:
        EvalInputError: some selected samples have no record (a process stopped early): re-run to resume.
    """
    run_dir = Path(run_dir)
    records = journal.merge_samples(run_dir, (s.key for s in task.samples))
    have = {r["key"] for r in records}
    missing = [s.key for s in task.samples if s.key not in have]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(task.samples)} samples have not been generated yet "
            f"(first: {', '.join(missing[:5])}); re-run the same command to resume"
        )
    wanted = {s.key for s in task.samples}
    records = [r for r in records if r["key"] in wanted]
    scores = task.score(records)
    saved = read_settings(run_dir) or {}
    payload = report.metrics_payload(
        task=task.name,
        run_dir=run_dir,
        settings=settings,
        resolved=saved.get("resolved", {}),
        records=records,
        scores=scores,
        stats=dataclasses.asdict(stats) if stats is not None else None,
    )
    if scores.get("units") is not None:
        report.write_units(run_dir, scores["units"])
    report.write_metrics(run_dir, payload)
    report.write_report(run_dir, payload, records, scores)
    html_report.write_html(run_dir, payload, scores.get("scored") or [], _image_paths(task))
    return payload


def run_eval(
    task: Task,
    settings: EvalSettings,
    run_dir: Path,
    load: Loader,
    *,
    retry_errors: bool = False,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    state: Any = None,
) -> dict[str, Any] | None:
    """The whole run: settings check, this process's generation, then (process 0) merge, score and report.

    ``rank``/``world_size`` default to the ``accelerate`` process (``WORLD_SIZE > 1``) or ``0``/``1``; with an
    accelerate ``state`` the processes wait for each other before generating and before merging. Returns the
    metrics payload on process 0, ``None`` elsewhere.
    """
    if rank is None or world_size is None:
        rank, world_size, state = distributed_context()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_settings(run_dir, settings, write=rank == 0)
    if state is not None:
        state.wait_for_everyone()
    stats = generate_shard(
        task,
        settings,
        run_dir,
        load,
        rank=rank,
        world_size=world_size,
        retry_errors=retry_errors,
        progress=progress,
    )
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    return finish_run(task, settings, run_dir, stats=stats)
