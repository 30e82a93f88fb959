"""CHAIR: caption hallucination scoring (Rohrbach et al., EMNLP 2018), original lineage by default.

A caption is turned into COCO object *mentions* by (``docs/chair.md``):

1. lower-casing; 2. sentence splitting on ``(?<=[.!?])\\s+``; 3. NLTK's Treebank word tokenizer per sentence;
4. pattern-3.6-style rule-based singularisation of every token; 5. a greedy, non-overlapping two-word merge;
6. the toilet rule (``toilet`` and ``seat`` together drop every ``seat``); 7. keeping exact vocabulary strings
and mapping each to its node word (the COCO category name).

Per caption ``c`` with mentions ``M_c`` (repeats kept), ground truth ``G_c`` and hallucinated mentions
``H_c = [m in M_c : m not in G_c]``:

* ``CHAIR_s = #{c : |H_c| >= 1} / #captions``
* ``CHAIR_i = sum_c |H_c| / sum_c |M_c|``
* ``Recall = sum_c |set(M_c) & G_c| / sum_c |G_c|``
* ``Precision = sum_c |set(M_c) & G_c| / sum_c |set(M_c)|``, ``F1 = 2PR / (P + R)``
* ``Len = mean n_tokens`` (length of the step-5 token list, punctuation included).

The singulariser re-implements the rule-based ``singularize`` of pattern 3.6 (CLiPS, University of Antwerp,
BSD-3-Clause; its singular rules were adapted from Bermi Ferrer's Inflector for Python, MIT-style licence).
The rule data below reproduce pattern's behaviour, quirks included; the code is our own.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError

__all__ = [
    "EvalInputError",
    "GroundTruth",
    "MERGE_TABLE",
    "Vocabulary",
    "build_gt_from_coco",
    "caption_mentions",
    "caption_tokens",
    "check_vocabulary",
    "compare_gt",
    "is_coco_annotation",
    "load_captions",
    "load_gt",
    "load_vocabulary",
    "parse_image_id",
    "parse_synonyms",
    "save_gt",
    "score_captions",
    "singularize",
    "tokenize",
]

LINEAGES = ("original", "opera")
DUPLICATES = ("keep", "last")
MISSING_GT = ("error", "empty")
_DATA = "data"
_SYNONYMS_FILE = "synonyms.txt"
_GT_FILE = "coco2014_gt_objects.json.gz"


# --------------------------------------------------------------------------------------------------
# Singulariser (pattern 3.6 rules; BSD-3-Clause, (c) 2010 University of Antwerp, author Tom De Smedt;
# singular rules after Bermi Ferrer's Inflector for Python, (c) 2006 Bermi Ferrer Martinez).
# --------------------------------------------------------------------------------------------------

# Prepositions of compounds such as "mothers-in-law": only the head before them is singularised.
_PREPOSITIONS = frozenset(
    "about above across after among around at athwart before behind below beneath beside besides between "
    "betwixt beyond but by during except for from in into near of off on onto out over since till to under "
    "until unto upon with".split()
)
# Pattern returns a word unchanged when some entry of these lists *ends with* it (so "a", "ice", "es" too).
_UNINFLECTED = tuple(
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks "
    "proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder "
    "jackanapes scissors christmas gallows mackerel series clippers georgia measles shears cod graffiti mews "
    "species contretemps mumps swine corps news swiss".split()
)
_UNCOUNTABLE = tuple(
    "advice equipment happiness luggage news software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice "
    "electricity gravel love mustard sand".split()
)
# "-ies" plurals kept as they are by pattern (it returns the lower-cased input). The "^" entries are literal in
# pattern's suffix test and therefore never match ("ties" -> "ty" through the rules below).
_IE_WORDS = tuple(
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie "
    "oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie laddie pixie techie bombie "
    "groupie laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie meanie rookie "
    "valkyrie".split()
)
# Irregular plurals, tested in this order as suffixes of the word ("women" -> "woman").
_IRREGULAR: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split(":"))  # type: ignore[misc]
    for pair in (
        "atlantes:atlas atlases:atlas axes:axe beeves:beef brethren:brother children:child corpora:corpus "
        "corpuses:corpus ephemerides:ephemeris feet:foot ganglia:ganglion geese:goose genera:genus genii:genie "
        "graffiti:graffito helves:helve kine:cow leaves:leaf loaves:loaf men:man mongooses:mongoose "
        "monies:money moves:move mythoi:mythos numena:numen occipita:occiput octopodes:octopus opera:opus "
        "opuses:opus our:my oxen:ox penes:penis penises:penis people:person sexes:sex soliloquies:soliloquy "
        "teeth:tooth testes:testis trilbys:trilby turves:turf zoa:zoon"
    ).split()
)
# Ordered suffix rules: the first pattern that matches rewrites the word (unmatched groups become "").
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"(?i)(.)ae$", r"\1a"),
        (r"(?i)(.)itis$", r"\1itis"),
        (r"(?i)(.)eaux$", r"\1eau"),
        (r"(?i)(quiz)zes$", r"\1"),
        (r"(?i)(matr)ices$", r"\1ix"),
        (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
        (r"(?i)^(ox)en", r"\1"),
        (r"(?i)(alias|status)es$", r"\1"),
        (r"(?i)([octop|vir])i$", r"\1us"),  # a character class in pattern: "...[octp|vir]i" -> "...us"
        (r"(?i)(cris|ax|test)es$", r"\1is"),
        (r"(?i)(shoe)s$", r"\1"),
        (r"(?i)(o)es$", r"\1"),
        (r"(?i)(bus)es$", r"\1"),
        (r"(?i)([m|l])ice$", r"\1ouse"),
        (r"(?i)(x|ch|ss|sh)es$", r"\1"),
        (r"(?i)(m)ovies$", r"\1ovie"),
        (r"(?i)(.)ombies$", r"\1ombie"),
        (r"(?i)(s)eries$", r"\1eries"),
        (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"),
        (r"([^d]ea)ves$", r"\1f"),
        (r"arves$", "arf"),
        (r"erves$", "erve"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"(?i)([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"),
        (r"(?i)(sive)s$", r"\1"),
        (r"(?i)(tive)s$", r"\1"),
        (r"(?i)(hive)s$", r"\1"),
        (r"(?i)([^f])ves$", r"\1fe"),
        (r"(?i)(^analy)ses$", r"\1sis"),
        (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
        (r"(?i)(.)opses$", r"\1opsis"),
        (r"(?i)(.)yses$", r"\1ysis"),
        (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(?i)(.)oses$", r"\1osis"),
        (r"(?i)([ti])a$", r"\1um"),
        (r"(?i)(n)ews$", r"\1ews"),
        (r"(?i)s$", ""),
    )
)


def _expand(match: re.Match[str], template: str) -> str:
    return re.sub(r"\\(\d)", lambda m: match.group(int(m.group(1))) or "", template)


@lru_cache(maxsize=65536)
def singularize(word: str) -> str:
    """Singular of ``word`` by pattern 3.6's rules (``bus``->``bu``, ``men``->``man``, ``ties``->``ty``).

    Order of tests: compounds with a preposition (``mothers-in-law``), a trailing apostrophe (``dogs'`` ->
    ``dog's``), the uninflected and uncountable lists (word returned unchanged when a list entry ends with it),
    the ``-ie`` list (returned lower-cased and unchanged), irregular suffixes, then the ordered suffix rules.
    """
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(entry.endswith(lower) for entry in _UNINFLECTED + _UNCOUNTABLE):
        return word
    if any(lower.endswith(entry + "s") for entry in _IE_WORDS):
        return lower
    for plural, singular in _IRREGULAR:
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for pattern, template in _RULES:
        match = pattern.search(word)
        if match:
            return word[: match.start()] + _expand(match, template) + word[match.end() :]
    return word


# --------------------------------------------------------------------------------------------------
# Vocabulary and the two-word merge table
# --------------------------------------------------------------------------------------------------


def _merge_table() -> dict[str, str]:
    identity = (
        "motor bike, motor cycle, air plane, traffic light, street light, traffic signal, stop light, "
        "fire hydrant, stop sign, parking meter, suit case, sports ball, baseball bat, baseball glove, "
        "tennis racket, wine glass, hot dog, cell phone, mobile phone, teddy bear, hair drier, potted plant, "
        "laptop computer, stove top oven, home plate, train track"
    ).split(", ")
    table = {key: key for key in identity}
    for animal in (
        "bird",
        "cat",
        "dog",
        "horse",
        "sheep",
        "cow",
        "elephant",
        "bear",
        "zebra",
        "giraffe",
        "animal",
        "cub",
    ):
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    table.update(
        {
            "passenger jet": "jet",
            "passenger train": "train",
            "bow tie": "tie",
            "toilet seat": "toilet",
            "wine glas": "wine glass",
        }
    )
    return table


MERGE_TABLE: dict[str, str] = _merge_table()
"""Two-token merge keys (55) and what they become; a value outside the vocabulary drops both tokens."""


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass(frozen=True)
class Vocabulary:
    """The CHAIR synonym table: every entry string mapped to its line's node word (COCO category name)."""

    to_node: Mapping[str, str]
    nodes: tuple[str, ...]
    md5: str
    source: str = ""

    def __contains__(self, word: object) -> bool:
        return word in self.to_node


def parse_synonyms(text: str) -> Vocabulary:
    """Parse the synonym file: each non-blank line is ``line.strip().split(", ")``; the first entry is the node.

    No further stripping or lower-casing, so entries such as ``" motor bike"`` and ``iPhone`` stay as they are
    (and never match a caption).
    """
    to_node: dict[str, str] = {}
    nodes: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entries = line.strip().split(", ")
        nodes.append(entries[0])
        for entry in entries:
            to_node[entry] = entries[0]
    return Vocabulary(to_node=to_node, nodes=tuple(nodes), md5=_md5(text.encode("utf-8")))


def _package_file(name: str) -> bytes:
    return importlib.resources.files("steer.evals").joinpath(_DATA).joinpath(name).read_bytes()


@lru_cache(maxsize=8)
def _load_vocabulary(path: str | None) -> Vocabulary:
    raw = _package_file(_SYNONYMS_FILE) if path is None else _read_bytes(Path(path))
    try:
        vocab = parse_synonyms(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise EvalInputError(f"{path}: not a UTF-8 synonym table") from None
    if not vocab.nodes:
        raise EvalInputError(f"{path}: empty synonym table")
    source = f"steer:{_SYNONYMS_FILE}" if path is None else str(path)
    return Vocabulary(to_node=vocab.to_node, nodes=vocab.nodes, md5=_md5(raw), source=source)


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Load a synonym file (default: the copy shipped with steer, md5 ``fdf03d16...``)."""
    return _load_vocabulary(None if path is None else str(path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EvalInputError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise EvalInputError(f"expected a file, got a directory: {path}") from None


# --------------------------------------------------------------------------------------------------
# Caption -> mentions
# --------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=1)
def _word_tokenizer() -> Callable[[str], list[str]]:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize


def tokenize(caption: str) -> list[str]:
    """Steps 1-3: lower-case, split sentences after ``.``/``!``/``?`` + whitespace, Treebank-tokenize each."""
    word_tokenize = _word_tokenizer()
    tokens: list[str] = []
    for sentence in _SENTENCE_END.split(caption.lower()):
        tokens.extend(word_tokenize(sentence))
    return tokens


def _merge(tokens: Sequence[str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i : i + 2])
        if i + 1 < len(tokens) and pair in MERGE_TABLE:
            merged.append(MERGE_TABLE[pair])
            i += 2
        else:
            merged.append(tokens[i])
            i += 1
    return merged


@lru_cache(maxsize=1)
def _opera_lemmatizer() -> Callable[[list[str]], list[str]]:
    import nltk

    resources = {
        "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng",
        "wordnet": "corpora/wordnet",
    }
    for name, resource in resources.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            raise EvalInputError(
                f"lineage='opera' needs the NLTK data package {name!r}, which was not found "
                f"(install it with nltk.download({name!r}) where possible, or use lineage='original')"
            ) from None
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()
    prefix_to_pos = {"J": "a", "V": "v", "N": "n", "R": "r"}

    def lemmatize(tokens: list[str]) -> list[str]:
        tagged = nltk.pos_tag(tokens)
        return [lemmatizer.lemmatize(tok, pos=prefix_to_pos.get(tag[:1], "n")) for tok, tag in tagged]

    return lemmatize


def caption_tokens(caption: str, lineage: str = "original") -> list[str]:
    """Steps 1-5: the merged token list whose length is the caption's ``n_tokens``."""
    tokens = tokenize(caption)
    if lineage == "original":
        base = [singularize(tok) for tok in tokens]
    elif lineage == "opera":
        base = _opera_lemmatizer()(tokens)
    else:
        raise EvalInputError(f"unknown CHAIR lineage {lineage!r}; expected one of {', '.join(LINEAGES)}")
    return _merge(base)


@dataclass(frozen=True)
class CaptionMentions:
    """Object mentions of one caption: vocabulary ``words`` and their ``nodes`` (parallel), and ``n_tokens``."""

    words: tuple[str, ...]
    nodes: tuple[str, ...]
    n_tokens: int


def caption_mentions(
    caption: str, vocabulary: Vocabulary | None = None, lineage: str = "original"
) -> CaptionMentions:
    """Steps 1-7: every vocabulary mention of ``caption`` (repeats kept) with its node word."""
    vocab = vocabulary or load_vocabulary()
    tokens = caption_tokens(caption, lineage)
    kept = tokens
    if "toilet" in kept and "seat" in kept:
        kept = [tok for tok in kept if tok != "seat"]
    words = tuple(tok for tok in kept if tok in vocab.to_node)
    return CaptionMentions(words=words, nodes=tuple(vocab.to_node[w] for w in words), n_tokens=len(tokens))


# --------------------------------------------------------------------------------------------------
# Inputs: captions and ground truth
# --------------------------------------------------------------------------------------------------

_IMAGE_ID = re.compile(r"(\d+)(?:\.[A-Za-z]+)?$")


def parse_image_id(value: Any) -> int:
    """An image id from an int, a numeric string or a COCO file name (``COCO_val2014_000000123456.jpg``)."""
    if isinstance(value, bool):
        raise EvalInputError(f"not an image id: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        match = _IMAGE_ID.search(Path(text).name)
        if match:
            return int(match.group(1))
    raise EvalInputError(f"not an image id: {value!r}")


def _read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects, or JSON lines (blank lines skipped)."""
    text = _read_bytes(path).decode("utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        numbered = list(enumerate(records, 1))
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
    for lineno, record in numbered:
        if not isinstance(record, dict):
            raise EvalInputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return [record for _, record in numbered]


def load_captions(
    path: str | Path, image_key: str = "image_id", caption_key: str = "caption"
) -> list[dict[str, Any]]:
    """Read captions (JSONL or a JSON array) as ``[{"image_id": int, "caption": str}]`` in file order."""
    path = Path(path)
    out: list[dict[str, Any]] = []
    for i, record in enumerate(_read_records(path), 1):
        if image_key not in record or caption_key not in record:
            raise EvalInputError(f"{path}: record {i} lacks {image_key!r} or {caption_key!r}")
        caption = record[caption_key]
        if not isinstance(caption, str):
            raise EvalInputError(f"{path}: record {i}: {caption_key!r} is not a string")
        try:
            image_id = parse_image_id(record[image_key])
        except EvalInputError as err:
            raise EvalInputError(f"{path}: record {i}: {err}") from None
        out.append({"image_id": image_id, "caption": caption})
    if not out:
        raise EvalInputError(f"{path}: no captions (an empty file scores nothing, not a perfect score)")
    return out


@dataclass(frozen=True)
class GroundTruth:
    """Ground-truth node words per image id, with where they came from (``source``) and an ``md5``."""

    objects: Mapping[int, frozenset[str]]
    source: str
    md5: str

    def __len__(self) -> int:
        return len(self.objects)


def _decode_json(raw: bytes, source: str) -> Any:
    raw_json = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    try:
        return json.loads(raw_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{source}: not a JSON ground-truth map ({err})") from None


def is_coco_annotation(data: Any) -> bool:
    """True for the content of a COCO annotation file (``instances_*.json``, ``captions_*.json``)."""
    return isinstance(data, dict) and isinstance(data.get("annotations"), list) and "images" in data


def _gt_from_json(raw: bytes, source: str) -> GroundTruth:
    data = _decode_json(raw, source)
    if is_coco_annotation(data):
        return _gt_from_coco_data([(Path(source), data)], None, load_vocabulary())
    if not isinstance(data, dict):
        raise EvalInputError(f"{source}: expected a JSON object {{image_id: [objects]}}")
    try:
        objects = {int(k): frozenset(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise EvalInputError(f"{source}: keys must be image ids and values lists of object words") from None
    if not objects:
        raise EvalInputError(f"{source}: the ground-truth map is empty")
    return GroundTruth(objects=objects, source=source, md5=_md5(raw))


@lru_cache(maxsize=1)
def _shipped_gt() -> GroundTruth:
    return _gt_from_json(_package_file(_GT_FILE), f"steer:{_GT_FILE}")


def load_gt(path: str | Path | None = None) -> GroundTruth:
    """Load a ``{"<image_id>": [node words]}`` map (``.json`` or ``.json.gz``), or build one from a COCO
    annotation file given directly (``instances_val2014.json``: the node words of each image's instance
    categories; a captions file: the node words its human captions mention); default: the shipped COCO-2014
    map (instances and captions united, as the original CHAIR code builds it)."""
    if path is None:
        return _shipped_gt()
    path = Path(path)
    return _gt_from_json(_read_bytes(path), str(path))


def _canonical(objects: Mapping[int, Iterable[str]]) -> dict[str, list[str]]:
    return {str(k): sorted(set(objects[k])) for k in sorted(objects)}


def save_gt(gt: GroundTruth | Mapping[int, Iterable[str]], path: str | Path) -> str:
    """Write ``{image_id: sorted list}`` as JSON (gzip when the name ends in ``.gz``); return the file's md5."""
    objects = gt.objects if isinstance(gt, GroundTruth) else gt
    data = json.dumps(_canonical(objects)).encode("utf-8")
    path = Path(path)
    raw = gzip.compress(data, mtime=0) if path.suffix == ".gz" else data
    path.write_bytes(raw)
    return _md5(raw)


def _coco_files(annotations: Path) -> list[Path]:
    """The COCO annotation files to read: ``annotations`` itself when it is a file, else the folder's
    ``instances_*2014.json`` and ``captions_*2014.json``."""
    if annotations.is_file():
        return [annotations]
    if not annotations.is_dir():
        raise EvalInputError(f"COCO annotation folder or file not found: {annotations}")
    files = sorted(annotations.glob("instances_*2014.json")) + sorted(annotations.glob("captions_*2014.json"))
    if not files:
        raise EvalInputError(
            f"{annotations}: no instances_*2014.json or captions_*2014.json (COCO 2014 annotations) found"
        )
    return files


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise EvalInputError(f"{path}: not a COCO annotation file (no 'annotations' list)")
    return data


@contextmanager
def _malformed(path: Path) -> Iterator[None]:
    try:
        yield
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, EvalInputError):
            raise
        raise EvalInputError(f"{path}: malformed COCO annotation ({type(err).__name__}: {err})") from None


def _is_captions(data: Mapping[str, Any]) -> bool:
    """A captions file (``captions_*.json``: no categories) rather than an instances file."""
    annotations = data["annotations"]
    first = annotations[0] if annotations and isinstance(annotations[0], Mapping) else {}
    return "categories" not in data or ("caption" in first and "category_id" not in first)


def _gt_from_coco_data(
    files: Sequence[tuple[Path, Mapping[str, Any]]], wanted: set[int] | None, vocab: Vocabulary
) -> GroundTruth:
    objects: dict[int, set[str]] = {}

    def slot(image_id: int) -> set[str] | None:
        if wanted is not None and image_id not in wanted:
            return None
        return objects.setdefault(image_id, set())

    ordered = [f for f in files if not _is_captions(f[1])] + [f for f in files if _is_captions(f[1])]
    for path, data in ordered:
        with _malformed(path):
            for image in data.get("images", []):
                slot(int(image["id"]))
            if _is_captions(data):
                from tqdm.auto import tqdm

                annotations = data["annotations"]
                for ann in tqdm(
                    annotations,
                    desc=f"CHAIR ground truth from {path.name}",
                    unit="caption",
                    disable=len(annotations) < 20000,
                    file=sys.stderr,
                ):
                    target = slot(int(ann["image_id"]))
                    if target is not None:
                        target.update(caption_mentions(str(ann["caption"]), vocab).nodes)
                continue
            names = {cat["id"]: cat["name"] for cat in data.get("categories", [])}
            for ann in data["annotations"]:
                target = slot(int(ann["image_id"]))
                if target is None:
                    continue
                name = names.get(ann["category_id"])
                if name is None or name not in vocab.to_node:
                    raise EvalInputError(
                        f"{path}: category {ann['category_id']} ({name!r}) is not a CHAIR node"
                    )
                target.add(vocab.to_node[name])
    frozen = {k: frozenset(v) for k, v in objects.items()}
    digest = _md5(json.dumps(_canonical(frozen)).encode("utf-8"))
    source = "coco:" + ",".join(p.name for p, _ in ordered)
    return GroundTruth(objects=frozen, source=source, md5=digest)


def build_gt_from_coco(
    annotation_dir: str | Path,
    image_ids: Iterable[int] | None = None,
    vocabulary: Vocabulary | None = None,
) -> GroundTruth:
    """Ground truth from COCO annotation files: a folder's ``instances_*2014.json`` / ``captions_*2014.json``
    (any subset of the four; plain JSON), or one annotation file given directly (any year).

    Per image: the node words of its instance categories united with the node words of its human captions
    run through steps 1-7. Images come from the files' ``images`` lists and annotations; ``image_ids``
    restricts the result.
    """
    vocab = vocabulary or load_vocabulary()
    files = [(path, _load_json_object(path)) for path in _coco_files(Path(annotation_dir))]
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    return _gt_from_coco_data(files, wanted, vocab)


def compare_gt(built: GroundTruth, reference: GroundTruth | None = None) -> list[int]:
    """Image ids of ``built`` whose object set differs from ``reference`` (default: the shipped map)."""
    ref = (reference or load_gt()).objects
    return sorted(k for k, v in built.objects.items() if ref.get(k) != v)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _truncate(caption: str) -> str:
    if caption.rstrip().endswith((".", "!", "?")) or "." not in caption:
        return caption
    return caption[: caption.rindex(".") + 1]


def _dedupe(captions: list[dict[str, Any]], duplicates: str) -> list[dict[str, Any]]:
    counts = Counter(c["image_id"] for c in captions)
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if not repeated:
        return captions
    if duplicates == "keep":
        shown = ", ".join(map(str, repeated[:10])) + (" ..." if len(repeated) > 10 else "")
        warnings.warn(f"{len(repeated)} image ids have several captions, all scored: {shown}", stacklevel=3)
        return captions
    last: dict[int, dict[str, Any]] = {}
    for c in captions:  # dict semantics: position of the first record, content of the last
        last[c["image_id"]] = c
    return list(last.values())


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def check_vocabulary(gt_objects: Mapping[int, Iterable[str]], vocabulary: Vocabulary, gt_source: str) -> None:
    """Refuse ground truth whose object words are not node words of the synonym table.

    Such words can never be mentioned, so every caption would look hallucinated and nothing recalled: the
    ground truth and the synonym table belong to different benchmarks (e.g. the built-in split's ground truth
    scored with COCO's table).
    """
    foreign = sorted(set().union(*gt_objects.values()) - set(vocabulary.nodes)) if gt_objects else []
    if foreign:
        shown = ", ".join(foreign[:8]) + (" ..." if len(foreign) > 8 else "")
        raise EvalInputError(
            f"the ground truth ({gt_source}) names objects that are not in the synonym table "
            f"({vocabulary.source or 'given'}, md5 {vocabulary.md5[:8]}): {shown}; they belong to different "
            "benchmarks: give the synonym table of this ground truth (--synonyms FILE; the built-in split's is "
            "synonyms.txt next to its gt_objects.json)"
        )


def score_captions(
    captions: Iterable[Mapping[str, Any]],
    gt: GroundTruth | Mapping[int, Iterable[str]] | None = None,
    *,
    vocabulary: Vocabulary | None = None,
    lineage: str = "original",
    duplicates: str = "keep",
    truncate_incomplete: bool = False,
    missing_gt: str = "error",
) -> dict[str, Any]:
    """Score captions (``{"image_id", "caption"}`` records) against ground truth (default: the shipped map).

    Returns ``{"config", "overall", "captions"}``: fractions (``CHAIR_s``, ``CHAIR_i``, ``Recall``,
    ``Precision``, ``F1``), ``Len`` and raw counts overall, and one record per scored caption in input order.
    ``duplicates``: ``"keep"`` scores every record (warning about repeated ids), ``"last"`` keeps the last
    caption per id. ``missing_gt``: ``"error"`` raises for ids absent from the ground truth, ``"empty"`` treats
    them as having no objects. ``truncate_incomplete``: cut a caption not ending in ``.``/``!``/``?`` after its
    last ``.``.
    """
    if lineage not in LINEAGES:
        raise EvalInputError(f"unknown CHAIR lineage {lineage!r}; expected one of {', '.join(LINEAGES)}")
    if duplicates not in DUPLICATES:
        raise EvalInputError(
            f"unknown duplicates option {duplicates!r}; expected one of {', '.join(DUPLICATES)}"
        )
    if missing_gt not in MISSING_GT:
        raise EvalInputError(
            f"unknown missing_gt option {missing_gt!r}; expected one of {', '.join(MISSING_GT)}"
        )
    vocab = vocabulary or load_vocabulary()
    if gt is None:
        gt = load_gt()
    if isinstance(gt, GroundTruth):
        gt_objects, gt_source, gt_md5 = gt.objects, gt.source, gt.md5
    else:
        gt_objects = {int(k): frozenset(v) for k, v in gt.items()}
        gt_source, gt_md5 = "mapping", _md5(json.dumps(_canonical(gt_objects)).encode("utf-8"))

    items = [{"image_id": parse_image_id(c["image_id"]), "caption": c["caption"]} for c in captions]
    if not items:
        raise EvalInputError("no captions to score (an empty input scores nothing, not a perfect score)")
    items = _dedupe(items, duplicates)
    missing = sorted({c["image_id"] for c in items} - set(gt_objects))
    if missing and missing_gt == "error":
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise EvalInputError(f"{len(missing)} image ids are not in the ground truth ({gt_source}): {shown}")
    check_vocabulary({c["image_id"]: gt_objects.get(c["image_id"], ()) for c in items}, vocab, gt_source)

    records = []
    totals: Counter[str] = Counter()
    for item in items:
        text = _truncate(item["caption"]) if truncate_incomplete else item["caption"]
        found = caption_mentions(text, vocab, lineage)
        truth = gt_objects.get(item["image_id"], frozenset())
        pairs = list(zip(found.words, found.nodes))
        hallucinated = [(w, n) for w, n in pairs if n not in truth]
        mentioned = set(found.nodes)
        recalled = len(mentioned & truth)
        records.append(
            {
                "image_id": item["image_id"],
                "caption": text,
                "mentions": [{"word": w, "node": n} for w, n in pairs],
                "hallucinated": [{"word": w, "node": n} for w, n in hallucinated],
                "gt": sorted(truth),
                "chair_s": int(bool(hallucinated)),
                "chair_i": _ratio(len(hallucinated), len(pairs)),
                "recalled": recalled,
                "n_tokens": found.n_tokens,
            }
        )
        totals.update(
            {
                "captions": 1,
                "hallucinated_captions": int(bool(hallucinated)),
                "mentions": len(pairs),
                "hallucinated_mentions": len(hallucinated),
                "gt_objects": len(truth),
                "recalled": recalled,
                "distinct_mentions": len(mentioned),
                "tokens": found.n_tokens,
            }
        )
    counts = {
        key: totals[key]
        for key in (
            "captions",
            "hallucinated_captions",
            "mentions",
            "hallucinated_mentions",
            "gt_objects",
            "recalled",
            "tokens",
        )
    }
    recall = _ratio(totals["recalled"], totals["gt_objects"])
    precision = _ratio(totals["recalled"], totals["distinct_mentions"])
    overall = {
        "CHAIR_s": _ratio(totals["hallucinated_captions"], totals["captions"]),
        "CHAIR_i": _ratio(totals["hallucinated_mentions"], totals["mentions"]),
        "Recall": recall,
        "Len": _ratio(totals["tokens"], totals["captions"]),
        "Precision": precision,
        "F1": _ratio(2 * precision * recall, precision + recall),
        "counts": counts,
    }
    config = {
        "lineage": lineage,
        "synonyms_md5": vocab.md5,
        "synonyms_source": vocab.source,
        "gt_source": gt_source,
        "gt_md5": gt_md5,
        "duplicates": duplicates,
        "truncate_incomplete": truncate_incomplete,
        "missing_gt": missing_gt,
        "missing_gt_ids": missing,
        "n": len(records),
    }
    return {"config": config, "overall": overall, "captions": records}
