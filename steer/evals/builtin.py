"""The built-in benchmark: ``steer eval chair|pope --model builtin:demo`` with nothing else.

``builtin:demo`` names the shipped steer-demo-llava (``steer/zoo/demo/``) and, unless the caller gives other
data, the fixed SynthScenes evaluation split: `N_IMAGES` scenes sampled from `EVAL_SEED` (disjoint from any
training seed in use: training samples from seed 0), rendered at the demo model's resolution. The split is
written once into a cache folder (`benchmark_dir`) in the formats the runner reads for COCO:

* ``images/synth_000000.png`` ... (the number is the image id),
* ``gt_objects.json``: the CHAIR ground-truth map ``{image_id: [kinds]}``,
* ``synonyms.txt``: the CHAIR synonym table of the 20 kinds,
* ``pope/synthscenes_pope_{random,popular,adversarial}.json``: POPE questions (JSON lines),
* ``split.json``: the provenance (seed, size, version, md5 of every file above).

Everything is deterministic: two machines build byte-identical files (PNG writing included).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from steer.errors import EvalInputError

__all__ = [
    "BUILTIN_DEMO",
    "EVAL_SEED",
    "N_IMAGES",
    "SPLIT_VERSION",
    "BuiltinSplit",
    "benchmark_dir",
    "is_builtin",
    "materialize",
    "resolve_model",
    "split",
]

BUILTIN_DEMO = "builtin:demo"
"""The ``--model`` value of the shipped demo model and its benchmark."""

EVAL_SEED = 1
"""Seed of the evaluation scenes (the demo model is trained on scenes of seed 0)."""

N_IMAGES = 500
"""Images in the evaluation split (as many as the OPERA-500 CHAIR protocol)."""

SPLIT_VERSION = "synthscenes-eval-v1"
"""Folder name of the materialised split; bump when the generator or the formats change."""

_POPE_NAME = "synthscenes_pope_{split}.json"


def is_builtin(model: str) -> bool:
    """True for ``builtin:demo`` (the only built-in model); other ``builtin:`` names are an error."""
    if not model.startswith("builtin:"):
        return False
    if model != BUILTIN_DEMO:
        raise EvalInputError(f"unknown built-in model {model!r}; the built-in model is {BUILTIN_DEMO}")
    return True


def resolve_model(model: str) -> str:
    """The folder of a built-in model (``builtin:demo`` -> the shipped steer-demo-llava), else `model`."""
    if not is_builtin(model):
        return model
    from steer.zoo import demo_model

    try:
        return str(demo_model.shipped_weights())
    except FileNotFoundError as exc:
        raise EvalInputError(str(exc)) from None


class BuiltinSplit:
    """Paths of a materialised split (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.gt_objects = self.root / "gt_objects.json"
        self.synonyms = self.root / "synonyms.txt"

    def pope_questions(self, split: str) -> Path:
        """The POPE question file of `split` (random, popular or adversarial)."""
        return self.root / "pope" / _POPE_NAME.format(split=split)

    @property
    def complete(self) -> bool:
        return (self.root / "split.json").is_file()


def benchmark_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the split is kept: ``<root or the zoo cache ($STEER_ZOO_DIR, ~/.cache/steer/zoo)>/<SPLIT_VERSION>``."""
    from steer.zoo.tiny import cache_root

    return cache_root(root) / SPLIT_VERSION


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def materialize(path: str | os.PathLike, n_images: int = N_IMAGES, seed: int = EVAL_SEED) -> BuiltinSplit:
    """Write the split into `path` (created; files already there are overwritten) and return its paths."""
    from steer.evals import chair
    from steer.zoo import demo_model, synthscenes

    out = BuiltinSplit(Path(path))
    out.images.mkdir(parents=True, exist_ok=True)
    (out.root / "pope").mkdir(exist_ok=True)
    scenes = synthscenes.sample_scenes(seed, n_images)
    for i, scene in enumerate(scenes):
        synthscenes.render(scene, demo_model.IMAGE_SIZE).save(out.images / synthscenes.image_name(i))
    chair.save_gt({i: s.kinds for i, s in enumerate(scenes)}, out.gt_objects)
    out.synonyms.write_text(synthscenes.synonyms_text(), encoding="utf-8")
    files = [out.gt_objects, out.synonyms]
    for name in synthscenes.POPE_SPLITS:
        questions = synthscenes.pope_questions(scenes, name, seed=seed)
        target = out.pope_questions(name)
        target.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
        files.append(target)
    image_md5 = hashlib.md5()
    for i in range(n_images):
        image_md5.update((out.images / synthscenes.image_name(i)).read_bytes())
    provenance = {
        "version": SPLIT_VERSION,
        "generator": "steer.zoo.synthscenes",
        "seed": seed,
        "n_images": n_images,
        "image_size": demo_model.IMAGE_SIZE,
        "images_md5": image_md5.hexdigest(),
        "files_md5": {str(f.relative_to(out.root)): _md5(f) for f in files},
    }
    (out.root / "split.json").write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    return out


def split(root: str | os.PathLike | None = None) -> BuiltinSplit:
    """The built-in split, materialised on first use (into a temporary folder, then renamed into place, so a
    crash never leaves a half-written split behind)."""
    target = benchmark_dir(root)
    found = BuiltinSplit(target)
    if found.complete:
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SPLIT_VERSION}-", dir=target.parent))
    try:
        materialize(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race, or a partial folder is in the way
            if not BuiltinSplit(target).complete:
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuiltinSplit(target)
