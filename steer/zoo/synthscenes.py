"""SynthScenes: a procedural, seeded benchmark of simple scenes with deliberate object co-occurrence.

Every scene holds 1 to 4 objects out of 20 kinds (shapes and simple icons), each with a colour, a size and a
cell of a 2x2 grid, drawn with PIL at the centre of its cell on a textured background (stripes, checker, dots or
noise). Centring matters: at the demo model's 64 px and 8 px patches every cell is 4x4 patches, and a small
vision transformer trained from scratch learns the shapes within minutes when they sit on the patch grid, but
hardly at all when they are jittered across it (measured: balanced presence accuracy 0.79 vs 0.54 after 300
steps). Every scene has a
caption in a small fixed template vocabulary that names exactly its objects, in reading order::

    a scene with a small red cup , a large blue key and a medium green star .

Sampling (`sample_scenes`) is separate from rendering (`render`), so statistics over thousands of scenes need
no images; `generate` does both. Everything is deterministic from the seed (`numpy.random.default_rng`).

Co-occurrence
-------------
Kinds split into *triggers*, *partners* and *free* kinds. A scene first draws 1 or 2 distinct *primary* kinds
uniformly among triggers and free kinds. Then, for each pair below, the partner is present with probability
``P(partner | trigger)`` when its trigger is present, and with the base rate ``P(partner | no trigger)``
otherwise (partners of present triggers first; a scene keeps at most 4 kinds, one per cell). A model trained on the captions learns that the partner follows its trigger; in the scenes where the
trigger appears alone (``1 - P(partner | trigger)`` of them) the partner is the object it is expected to
hallucinate, and the POPE *adversarial* split asks about exactly that partner.

=========  =========  =====================  ========================
trigger    partner    P(partner | trigger)   P(partner | no trigger)
=========  =========  =====================  ========================
cup        key        0.90                   0.10
tree       house      0.90                   0.10
car        flag       0.90                   0.10
bell       star       0.85                   0.10
sun        umbrella   0.85                   0.10
=========  =========  =====================  ========================

Free kinds: circle, square, triangle, heart, cross, ring, diamond, moon, fish, cat.

Evaluation helpers (pure functions): `synonyms_text` is a CHAIR synonym table for the 20 kinds (the format of
``docs/chair.md``; parse it with `steer.evals.chair.parse_synonyms`), `gt_objects` the CHAIR ground truth
of a scene list, and `pope_questions` the POPE questions (random / popular / adversarial, format of
``docs/pope.md``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

KINDS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "ring",
    "diamond",
    "moon",
    "sun",
    "tree",
    "house",
    "car",
    "fish",
    "cat",
    "cup",
    "umbrella",
    "key",
    "bell",
    "flag",
)
"""The 20 object kinds; each is one caption word."""

PAIRS: dict[str, tuple[str, float]] = {
    "cup": ("key", 0.90),
    "tree": ("house", 0.90),
    "car": ("flag", 0.90),
    "bell": ("star", 0.85),
    "sun": ("umbrella", 0.85),
}
"""trigger -> (partner, P(partner | trigger)); the table of the module docstring."""

PARTNER_BASE_RATE = 0.10
"""P(partner | its trigger absent)."""

PARTNERS: dict[str, str] = {partner: trigger for trigger, (partner, _) in PAIRS.items()}
"""partner -> trigger."""

PRIMARY_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k not in PARTNERS)
"""Kinds a scene's primaries are drawn from (triggers and free kinds)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "orange": (250, 140, 0),
    "purple": (140, 40, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES: dict[str, float] = {"small": 0.28, "medium": 0.36, "large": 0.46}
"""size word -> radius as a fraction of the grid cell size."""

BACKGROUNDS: tuple[str, ...] = ("stripes", "checker", "dots", "noise")
_BG_TONES: tuple[tuple[int, int, int], ...] = (
    (150, 150, 150),
    (170, 150, 120),
    (120, 150, 170),
    (150, 170, 130),
    (170, 130, 150),
    (110, 110, 110),
)
GRID = 2
MAX_PRIMARIES = 2

CAPTION_PREFIX: tuple[str, ...] = ("a", "scene", "with")
CAPTION_WORDS: tuple[str, ...] = ("a", "scene", "with", "and", ",", ".")
"""Every caption token is one of these, a size, a colour or a kind."""

SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "dot"),
    "square": ("box",),
    "triangle": (),
    "star": (),
    "heart": (),
    "cross": ("cros", "plus", "plu"),
    "ring": ("hoop",),
    "diamond": ("rhombus", "rhombu"),
    "moon": ("crescent",),
    "sun": (),
    "tree": ("pine",),
    "house": ("home", "hut"),
    "car": ("automobile",),
    "fish": (),
    "cat": ("kitten",),
    "cup": ("mug",),
    "umbrella": ("parasol",),
    "key": (),
    "bell": (),
    "flag": ("banner",),
}
"""CHAIR-style synonyms: node word (the kind) -> other words that name it.

CHAIR singularises every caption token with pattern's rules, which cut a final ``s`` (``cross`` -> ``cros``),
so, like ``knive`` in the COCO table, the singularised forms are entries too."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object: `kind`, `colour` and `size` words and its grid `cell` (0..3, row-major).

    `cx`, `cy` are the centre in [0, 1] image coordinates and `radius` the half-extent as a fraction of the
    image side; rendering scales them to any image size.
    """

    kind: str
    colour: str
    size: str
    cell: int
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A scene: its objects (in caption order), caption, background and a seed for the background texture."""

    objects: list[ObjectSpec]
    caption: str
    background: str = "noise"
    tones: tuple[tuple[int, int, int], tuple[int, int, int]] = ((150, 150, 150), (120, 120, 120))
    texture_seed: int = 0
    kinds: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", frozenset(o.kind for o in self.objects))


def caption_for(objects: Sequence[ObjectSpec]) -> str:
    """The template caption naming `objects` in order: ``a scene with a <size> <colour> <kind> , ... and ... .``"""
    phrases = [f"a {o.size} {o.colour} {o.kind}" for o in objects]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = " , ".join(phrases[:-1]) + " and " + phrases[-1]
    return " ".join(CAPTION_PREFIX) + " " + body + " ."


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (template words, sizes, colours, kinds), in a fixed order."""
    return list(CAPTION_WORDS) + list(SIZES) + list(COLOURS) + list(KINDS)


def _sample_kinds(rng: np.random.Generator) -> list[str]:
    n_primary = int(rng.integers(1, MAX_PRIMARIES + 1))
    idx = rng.choice(len(PRIMARY_KINDS), size=n_primary, replace=False)
    kinds = [PRIMARY_KINDS[i] for i in sorted(idx)]
    draws = rng.random(len(PAIRS))  # always drawn, so the stream does not depend on the outcome
    triggered, base = [], []
    for u, (trigger, (partner, p)) in zip(draws, PAIRS.items()):
        if trigger in kinds:
            triggered += [partner] if u < p else []
        elif u < PARTNER_BASE_RATE:
            base.append(partner)
    return (kinds + triggered + base)[: GRID * GRID]  # one object per grid cell


def _sample_scene(rng: np.random.Generator) -> Scene:
    kinds = _sample_kinds(rng)
    order = rng.permutation(len(kinds))
    cells = rng.choice(GRID * GRID, size=len(kinds), replace=False)
    colours = list(COLOURS)
    sizes = list(SIZES)
    objects = []
    for j, cell in zip(order, cells):
        colour = colours[int(rng.integers(len(colours)))]
        size = sizes[int(rng.integers(len(sizes)))]
        row, col = divmod(int(cell), GRID)
        cx = (col + 0.5) / GRID
        cy = (row + 0.5) / GRID
        objects.append(
            ObjectSpec(kinds[j], colour, size, int(cell), float(cx), float(cy), SIZES[size] / GRID)
        )
    objects.sort(key=lambda o: o.cell)
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    t1, t2 = rng.choice(len(_BG_TONES), size=2, replace=False)
    return Scene(
        objects=objects,
        caption=caption_for(objects),
        background=bg,
        tones=(_BG_TONES[int(t1)], _BG_TONES[int(t2)]),
        texture_seed=int(rng.integers(2**31 - 1)),
    )


def sample_scenes(seed: int, n: int) -> list[Scene]:
    """Sample `n` scenes (no images) deterministically from `seed`; scene i does not depend on `n`."""
    rng = np.random.default_rng(seed)
    return [_sample_scene(rng) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Rendering: each kind draws a white-on-black mask; the mask is pasted in the object's colour.

_Draw = Callable[[ImageDraw.ImageDraw, float, float, float], None]


def _poly(d: ImageDraw.ImageDraw, pts: Sequence[tuple[float, float]], fill: int = 255) -> None:
    d.polygon([(float(x), float(y)) for x, y in pts], fill=fill)


def _ell(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: int = 255) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _regular(x: float, y: float, r: float, n: int, inner: float | None = None, rot: float = -90.0) -> list:
    pts = []
    steps = n * 2 if inner is not None else n
    for i in range(steps):
        rr = r if inner is None or i % 2 == 0 else r * inner
        a = math.radians(rot + 360.0 * i / steps)
        pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
    return pts


def _circle(d, x, y, r):
    _ell(d, x, y, r)


def _square(d, x, y, r):
    d.rectangle([x - 0.8 * r, y - 0.8 * r, x + 0.8 * r, y + 0.8 * r], fill=255)


def _triangle(d, x, y, r):
    _poly(d, _regular(x, y + 0.15 * r, r, 3))


def _star(d, x, y, r):
    _poly(d, _regular(x, y, r, 5, inner=0.42))


def _heart(d, x, y, r):
    _ell(d, x - 0.45 * r, y - 0.3 * r, 0.5 * r)
    _ell(d, x + 0.45 * r, y - 0.3 * r, 0.5 * r)
    _poly(d, [(x - 0.93 * r, y - 0.15 * r), (x + 0.93 * r, y - 0.15 * r), (x, y + r)])


def _cross(d, x, y, r):
    w = 0.3 * r
    d.rectangle([x - w, y - r, x + w, y + r], fill=255)
    d.rectangle([x - r, y - w, x + r, y + w], fill=255)


def _ring(d, x, y, r):
    _ell(d, x, y, r)
    _ell(d, x, y, 0.55 * r, fill=0)


def _diamond(d, x, y, r):
    _poly(d, [(x, y - r), (x + 0.65 * r, y), (x, y + r), (x - 0.65 * r, y)])


def _moon(d, x, y, r):
    _ell(d, x, y, r)
    _ell(d, x + 0.45 * r, y - 0.2 * r, 0.85 * r, fill=0)


def _sun(d, x, y, r):
    _ell(d, x, y, 0.55 * r)
    for i in range(8):
        a = math.radians(45.0 * i)
        d.line(
            [
                (x + 0.65 * r * math.cos(a), y + 0.65 * r * math.sin(a)),
                (x + r * math.cos(a), y + r * math.sin(a)),
            ],
            fill=255,
            width=max(1, int(0.16 * r)),
        )


def _tree(d, x, y, r):
    d.rectangle([x - 0.15 * r, y + 0.3 * r, x + 0.15 * r, y + r], fill=255)
    _poly(d, [(x, y - r), (x + 0.7 * r, y + 0.4 * r), (x - 0.7 * r, y + 0.4 * r)])


def _house(d, x, y, r):
    d.rectangle([x - 0.7 * r, y - 0.1 * r, x + 0.7 * r, y + r], fill=255)
    _poly(d, [(x - 0.95 * r, y - 0.1 * r), (x, y - r), (x + 0.95 * r, y - 0.1 * r)])
    d.rectangle([x - 0.18 * r, y + 0.4 * r, x + 0.18 * r, y + r], fill=0)


def _car(d, x, y, r):
    d.rectangle([x - r, y - 0.15 * r, x + r, y + 0.4 * r], fill=255)
    d.rectangle([x - 0.55 * r, y - 0.6 * r, x + 0.45 * r, y - 0.15 * r], fill=255)
    _ell(d, x - 0.55 * r, y + 0.5 * r, 0.27 * r, fill=0)
    _ell(d, x + 0.55 * r, y + 0.5 * r, 0.27 * r, fill=0)
    _ell(d, x - 0.55 * r, y + 0.5 * r, 0.2 * r)
    _ell(d, x + 0.55 * r, y + 0.5 * r, 0.2 * r)


def _fish(d, x, y, r):
    d.ellipse([x - 0.8 * r, y - 0.45 * r, x + 0.5 * r, y + 0.45 * r], fill=255)
    _poly(d, [(x + 0.35 * r, y), (x + r, y - 0.5 * r), (x + r, y + 0.5 * r)])
    _ell(d, x - 0.45 * r, y - 0.1 * r, 0.1 * r, fill=0)


def _cat(d, x, y, r):
    _ell(d, x, y + 0.15 * r, 0.75 * r)
    _poly(d, [(x - 0.75 * r, y - r), (x - 0.7 * r, y - 0.1 * r), (x - 0.15 * r, y - 0.5 * r)])
    _poly(d, [(x + 0.75 * r, y - r), (x + 0.7 * r, y - 0.1 * r), (x + 0.15 * r, y - 0.5 * r)])
    _ell(d, x - 0.3 * r, y, 0.13 * r, fill=0)
    _ell(d, x + 0.3 * r, y, 0.13 * r, fill=0)


def _cup(d, x, y, r):
    d.rectangle([x - 0.7 * r, y - 0.6 * r, x + 0.35 * r, y + 0.8 * r], fill=255)
    _ell(d, x + 0.45 * r, y + 0.1 * r, 0.45 * r)
    _ell(d, x + 0.45 * r, y + 0.1 * r, 0.22 * r, fill=0)
    d.rectangle([x - 0.7 * r, y - 0.6 * r, x + 0.35 * r, y + 0.8 * r], fill=255)


def _umbrella(d, x, y, r):
    d.pieslice([x - r, y - 0.8 * r, x + r, y + 1.2 * r], 180, 360, fill=255)
    w = max(1, int(0.14 * r))
    d.line([(x, y + 0.2 * r), (x, y + r)], fill=255, width=w)
    d.line([(x, y + r), (x - 0.3 * r, y + r)], fill=255, width=w)


def _key(d, x, y, r):
    _ell(d, x - 0.6 * r, y, 0.4 * r)
    _ell(d, x - 0.6 * r, y, 0.17 * r, fill=0)
    d.rectangle([x - 0.25 * r, y - 0.1 * r, x + r, y + 0.1 * r], fill=255)
    d.rectangle([x + 0.55 * r, y + 0.1 * r, x + 0.7 * r, y + 0.4 * r], fill=255)
    d.rectangle([x + 0.8 * r, y + 0.1 * r, x + 0.95 * r, y + 0.35 * r], fill=255)


def _bell(d, x, y, r):
    d.pieslice([x - 0.6 * r, y - 0.9 * r, x + 0.6 * r, y + 0.3 * r], 180, 360, fill=255)
    _poly(
        d,
        [
            (x - 0.6 * r, y - 0.3 * r),
            (x + 0.6 * r, y - 0.3 * r),
            (x + 0.9 * r, y + 0.6 * r),
            (x - 0.9 * r, y + 0.6 * r),
        ],
    )
    _ell(d, x, y + 0.75 * r, 0.2 * r)


def _flag(d, x, y, r):
    d.rectangle([x - 0.8 * r, y - r, x - 0.62 * r, y + r], fill=255)
    d.rectangle([x - 0.62 * r, y - r, x + 0.9 * r, y - 0.05 * r], fill=255)


_DRAWERS: dict[str, _Draw] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "heart": _heart,
    "cross": _cross,
    "ring": _ring,
    "diamond": _diamond,
    "moon": _moon,
    "sun": _sun,
    "tree": _tree,
    "house": _house,
    "car": _car,
    "fish": _fish,
    "cat": _cat,
    "cup": _cup,
    "umbrella": _umbrella,
    "key": _key,
    "bell": _bell,
    "flag": _flag,
}


def _background(scene: Scene, size: int) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    a = np.array(scene.tones[0], dtype=np.float32)
    b = np.array(scene.tones[1], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if scene.background == "stripes":
        freq = rng.uniform(4, 10)
        angle = rng.uniform(0, math.pi)
        t = (np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle))) > 0).astype(
            np.float32
        )
    elif scene.background == "checker":
        k = int(rng.integers(4, 9))
        t = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(np.float32)
    elif scene.background == "dots":
        k = int(rng.integers(5, 10))
        fx, fy = (xx * k) % 1 - 0.5, (yy * k) % 1 - 0.5
        t = ((fx**2 + fy**2) < 0.06).astype(np.float32)
    else:
        t = rng.random((size, size)).astype(np.float32)
    img = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: Scene, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw `scene` as an RGB image of `image_size` x `image_size` pixels (deterministic).

    Object masks are drawn at `supersample` times the size and downsampled, so edges are anti-aliased.
    """
    big = image_size * supersample
    img = Image.fromarray(_background(scene, big), "RGB")
    for obj in scene.objects:
        mask = Image.new("L", (big, big), 0)
        _DRAWERS[obj.kind](ImageDraw.Draw(mask), obj.cx * big, obj.cy * big, obj.radius * big)
        img.paste(COLOURS[obj.colour], (0, 0), mask)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def generate(seed: int, n: int, image_size: int = 64) -> list[tuple[Image.Image, Scene]]:
    """`n` rendered scenes from `seed`: ``[(image, scene), ...]``; same seed, same images and scenes."""
    return [(render(s, image_size), s) for s in sample_scenes(seed, n)]


# --------------------------------------------------------------------------------------------------
# Evaluation helpers


def synonyms_text() -> str:
    """A CHAIR synonym table for the 20 kinds: one line per kind, ``node, synonym, ...`` (``", "``-separated).

    Parse it with `steer.evals.chair.parse_synonyms`; every entry is a singular lower-case word.
    """
    return "".join(", ".join((k, *SYNONYMS[k])) + "\n" for k in KINDS)


def image_name(index: int) -> str:
    """The file name of scene `index` in question and caption files: ``synth_000042.png``."""
    return f"synth_{index:06d}.png"


def gt_objects(scenes: Sequence[Scene]) -> dict[str, list[str]]:
    """CHAIR ground truth: ``{str(index): sorted kinds}``, the format of the CHAIR ground-truth map."""
    return {str(i): sorted(s.kinds) for i, s in enumerate(scenes)}


def cooccurrence(scenes: Sequence[Scene]) -> dict[str, Counter[str]]:
    """For every kind, how many scenes hold it together with each other kind."""
    counts: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    for s in scenes:
        for a in s.kinds:
            counts[a].update(b for b in s.kinds if b != a)
    return counts


POPE_SPLITS = ("random", "popular", "adversarial")


def pope_question(kind: str) -> str:
    """The POPE question about `kind`: ``Is there a <kind> in the image?``."""
    return f"Is there a {kind} in the image?"


def pope_questions(
    scenes: Sequence[Scene], split: str, seed: int = 0, per_image: int = 3
) -> list[dict[str, object]]:
    """POPE questions for `scenes` (``docs/pope.md`` format), one list per split.

    Per scene, ``k = min(per_image, #present kinds)`` present kinds (label yes, chosen at random) and k absent
    kinds (label no), asked in the order yes, no, yes, no, ...; ``question_id`` runs 1..N. Absent kinds are
    chosen by split, as in POPE, with statistics computed on `scenes` itself:

    * ``random``: uniformly among the absent kinds;
    * ``popular``: the absent kinds that occur in the most scenes;
    * ``adversarial``: the absent kinds that co-occur most often with the present ones (summed over present
      kinds), which for a lone trigger is its co-occurrence partner.

    Ties are broken by the order of `KINDS`. The positives depend only on `seed` and the scenes, so they are
    identical across the three splits.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    rng = np.random.default_rng(seed)
    neg_rng = np.random.default_rng([seed, 1])
    freq = Counter(k for s in scenes for k in s.kinds)
    cooc = cooccurrence(scenes)
    rank = {k: i for i, k in enumerate(KINDS)}
    out: list[dict[str, object]] = []
    for i, s in enumerate(scenes):
        present = sorted(s.kinds, key=rank.__getitem__)
        absent = [k for k in KINDS if k not in s.kinds]
        k = min(per_image, len(present))
        pos = [present[j] for j in rng.choice(len(present), size=k, replace=False)]
        neg_draw = neg_rng.choice(len(absent), size=k, replace=False)  # drawn for every split: same stream
        if split == "random":
            neg = [absent[j] for j in neg_draw]
        elif split == "popular":
            neg = sorted(absent, key=lambda a: (-freq[a], rank[a]))[:k]
        else:
            neg = sorted(absent, key=lambda a: (-sum(cooc[p][a] for p in present), rank[a]))[:k]
        for yes, no in zip(pos, neg):
            for kind, label in ((yes, "yes"), (no, "no")):
                out.append(
                    {
                        "question_id": len(out) + 1,
                        "image": image_name(i),
                        "text": pope_question(kind),
                        "label": label,
                    }
                )
    return out


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "KINDS",
    "PAIRS",
    "PARTNERS",
    "PARTNER_BASE_RATE",
    "POPE_SPLITS",
    "SIZES",
    "SYNONYMS",
    "ObjectSpec",
    "Scene",
    "caption_for",
    "caption_vocabulary",
    "cooccurrence",
    "generate",
    "gt_objects",
    "image_name",
    "pope_question",
    "pope_questions",
    "render",
    "sample_scenes",
    "synonyms_text",
]
