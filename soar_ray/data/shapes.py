"""The shapes world: flat shapes on grey, captioned in GenEval's tags, with an exact scorer.

A small, fully known stand-in for GenEval (Ghosh et al. 2023): 1-4 filled, axis-aligned shapes
(SHAPES) in well-separated colours (PALETTE, named as GenEval's colours) on a grey BACKGROUND that
is no palette colour, sizes and places jittered with a margin between shapes. Every prompt is a
GenEval metadata row (`tag`, `include`, `exclude` for counting, `prompt`) in GenEval's wording:
"a photo of a circle", "a photo of a circle and a square", "a photo of three circles", "a photo
of a red circle", "a photo of a circle left of a square", "a photo of a red circle and a blue
square". The world has a finite set of rows (`all_rows`); `rewards/shapes_geneval.py` scores an
image against a row exactly.

Held-out compositions (`make_split`): a seeded choice of colour-shape pairs, count-shape pairs
and shape pairs that no training caption (nor training image) holds; `Split.held_out_rows` are
the rows holding exactly one of them, so a held-out prompt mixes one unseen composition with
seen ones. `make_shapes_set` writes a training set in the image-caption format of
`soar_ray/data/synthetic.py` plus the prompt sets, in GenEval's JSONL, for RL and evaluation.
Coordinates are fractions of the image side, y pointing down. Everything is a function of seeds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rewards.geneval.detectors import Detection
from rewards.geneval.rules import COLORS, RELATIONS, TAGS, relative_position
from soar_ray.data.synthetic import (
    IMAGE_DIR,
    INDEX_FILE,
    MARKER_FILE,
    is_complete,  # same folder format and marker
)

# GenEval colour names -> RGB: cube corners and edge midpoints, at least 127 apart, and at least
# 180 from the background, so a blurred edge never looks like another palette colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "purple": (128, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle", "cross", "bar")
"""Upright triangle (apex up), plus-shaped cross (arms a third of its side), horizontal bar."""
BAR_HEIGHT = 0.4
"""A bar's height over its width; every other shape has a square bounding box."""
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
"""Counts of the counting tag, GenEval's."""
SIZE_RANGES = {1: (0.28, 0.38), 2: (0.26, 0.36), 3: (0.24, 0.3), 4: (0.24, 0.28)}
"""Number of shapes in an image -> range of a shape's side."""
BORDER, MARGIN = 0.04, 0.08
"""Free space between a shape and the image edge, and between two shapes' boxes."""
POSITION_THRESHOLD = 0.25
"""Position scenes satisfy GenEval's relation at this tolerance (the scorer uses 0.1)."""
SUPERSAMPLE = 4
"""Shapes are drawn this many times larger and box-filtered down: antialiased edges."""

assert set(PALETTE) <= set(COLORS), "palette colours must be GenEval colour names"


@dataclass(frozen=True)
class Figure:
    """One drawn shape: its kind, colour name and box (x0, y0, x1, y1) in fractions of the side."""

    shape: str
    color: str
    box: tuple[float, float, float, float]


def plural(shape: str) -> str:
    """'circles', 'crosses'."""
    return shape + ("es" if shape.endswith("s") else "s")


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _clause(shape: str, count: int = 1, color: str | None = None, position: Any = None) -> dict:
    """One include clause, keys in GenEval's order."""
    clause: dict[str, Any] = {"class": shape, "count": count}
    if color is not None:
        clause["color"] = color
    if position is not None:
        clause["position"] = list(position)
    return clause


def make_row(tag: str, include: list[dict]) -> dict[str, Any]:
    """The GenEval row of `tag` for its include clauses, with GenEval's prompt wording."""
    names = [_with_article(" ".join(filter(None, (c.get("color"), c["class"])))) for c in include]
    row: dict[str, Any] = {"tag": tag, "include": include}
    if tag in ("single_object", "colors"):
        text = names[0]
    elif tag in ("two_object", "color_attr"):
        text = f"{names[0]} and {names[1]}"
    elif tag == "counting":
        count, shape = include[0]["count"], include[0]["class"]
        row["exclude"] = [_clause(shape, count + 1)]
        text = f"{COUNT_WORDS[count]} {plural(shape)}"
    elif tag == "position":  # "a photo of A <relation> B": B is include[0], A names it
        text = f"{names[1]} {include[1]['position'][0]} {names[0]}"
    else:
        raise ValueError(f"shapes: tag {tag!r} is not one of {TAGS}")
    row["prompt"] = f"a photo of {text}"
    return row


def all_rows() -> list[dict[str, Any]]:
    """Every GenEval row of the world, in a fixed order (tags in GenEval's order)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    colored = list(itertools.product(SHAPES, PALETTE))
    rows = [make_row("single_object", [_clause(s)]) for s in SHAPES]
    rows += [make_row("two_object", [_clause(a), _clause(b)]) for a, b in pairs]
    rows += [make_row("counting", [_clause(s, n)]) for s in SHAPES for n in COUNT_WORDS]
    rows += [make_row("colors", [_clause(s, color=c)]) for s, c in colored]
    rows += [
        make_row("position", [_clause(b), _clause(a, position=(relation, 0))])
        for a, b in pairs
        for relation in RELATIONS
    ]
    rows += [
        make_row("color_attr", [_clause(a, color=ca), _clause(b, color=cb)])
        for (a, ca), (b, cb) in itertools.product(colored, colored)
        if a != b and ca != cb
    ]
    return rows


def compositions(row: dict[str, Any]) -> set[tuple]:
    """What a row composes: ('color', colour, shape), ('count', n, shape), ('pair', a, b)."""
    include = row["include"]
    found: set[tuple] = {("color", c["color"], c["class"]) for c in include if "color" in c}
    if row["tag"] == "counting":
        found.add(("count", include[0]["count"], include[0]["class"]))
    if len(include) == 2:
        found.add(("pair", *sorted(c["class"] for c in include)))
    return found


@dataclass(frozen=True)
class Split:
    """Held-out compositions of a split seed (see `compositions`); training never shows them."""

    seed: int
    held_out: frozenset[tuple]

    def num_held_out(self, row: dict[str, Any]) -> int:
        """How many of the row's compositions are held out."""
        return len(compositions(row) & self.held_out)

    @property
    def training_rows(self) -> list[dict[str, Any]]:
        """Rows holding no held-out composition: the captions training may use."""
        return [row for row in all_rows() if self.num_held_out(row) == 0]

    @property
    def held_out_rows(self) -> list[dict[str, Any]]:
        """Rows holding exactly one held-out composition, the rest of the row seen."""
        return [row for row in all_rows() if self.num_held_out(row) == 1]

    def colors_for(self, shape: str) -> list[str]:
        """Palette colours a training image may give `shape` when its caption names none."""
        return [c for c in PALETTE if ("color", c, shape) not in self.held_out]


def make_split(
    seed: int, colors_per_shape: int = 1, shapes_per_count: int = 1, num_pairs: int = 2
) -> Split:
    """Hold out `colors_per_shape` colours of every shape, `shapes_per_count` shapes of every
    count and `num_pairs` shape pairs; a colour (shape) is held out for as few shapes (counts)
    as the numbers allow, so every colour and shape keeps seen compositions."""
    num_all_pairs = len(SHAPES) * (len(SHAPES) - 1) // 2
    for name, value, limit in (
        ("colors_per_shape", colors_per_shape, len(PALETTE) // 2),
        ("shapes_per_count", shapes_per_count, len(SHAPES) // 2),
        ("num_pairs", num_pairs, num_all_pairs // 2),
    ):  # at most half of each kind held out, so every colour and shape stays seen
        if not 0 <= value <= limit:
            raise ValueError(f"shapes split: {name} must be in [0, {limit}], got {value}")
    rng = np.random.default_rng(seed)
    colors = [str(c) for c in rng.permutation(list(PALETTE))]
    held_out = {
        ("color", colors[(i * colors_per_shape + j) % len(colors)], shape)
        for i, shape in enumerate(SHAPES)
        for j in range(colors_per_shape)
    }
    shapes = [str(s) for s in rng.permutation(list(SHAPES))]
    held_out |= {
        ("count", count, shapes[(i * shapes_per_count + j) % len(shapes)])
        for i, count in enumerate(COUNT_WORDS)
        for j in range(shapes_per_count)
    }
    pairs = list(itertools.combinations(SHAPES, 2))
    picked = rng.choice(len(pairs), num_pairs, replace=False)
    held_out |= {("pair", *sorted(pairs[i])) for i in picked}
    return Split(seed, frozenset(held_out))


def evaluation_rows(
    split: Split, num_per_tag: int, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(seen, held-out) evaluation rows: up to `num_per_tag` of each tag, drawn without
    replacement from the training rows and from the held-out rows (single_object has none)."""
    if num_per_tag < 1:
        raise ValueError(f"num_per_tag must be >= 1, got {num_per_tag}")
    rng = np.random.default_rng(seed)

    def draw(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        picked = []
        for tag in TAGS:
            of_tag = [row for row in rows if row["tag"] == tag]
            chosen = rng.choice(len(of_tag), min(num_per_tag, len(of_tag)), replace=False)
            picked += [of_tag[i] for i in sorted(chosen)]
        return picked

    return draw(split.training_rows), draw(split.held_out_rows)


def _apart(box: tuple[float, ...], other: tuple[float, ...]) -> bool:
    """The boxes are at least MARGIN apart along x or along y."""
    gaps = (other[0] - box[2], box[0] - other[2], other[1] - box[3], box[1] - other[3])
    return max(gaps) >= MARGIN


def _layout(shapes: list[str], rng: np.random.Generator) -> list[tuple[float, ...]] | None:
    """Boxes for `shapes`, inside the border and MARGIN apart, or None when placing got stuck."""
    low, high = SIZE_RANGES[len(shapes)]
    boxes: list[tuple[float, ...]] = []
    for shape in shapes:
        width = rng.uniform(low, high)
        height = width * (BAR_HEIGHT if shape == "bar" else 1.0)
        for _ in range(50):
            x0 = rng.uniform(BORDER, 1 - BORDER - width)
            y0 = rng.uniform(BORDER, 1 - BORDER - height)
            box = (x0, y0, x0 + width, y0 + height)
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def scene_for(
    row: dict[str, Any], rng: np.random.Generator, split: Split | None = None
) -> tuple[Figure, ...]:
    """A ground-truth scene of `row`: exactly its objects, placed as its position asks; a colour
    the row leaves open is one the split lets training show (any, without a split)."""
    objects = []
    for clause in row["include"]:
        shape = clause["class"]
        colors = split.colors_for(shape) if split is not None else list(PALETTE)
        for _ in range(clause["count"]):
            objects.append((shape, clause.get("color") or str(rng.choice(colors))))
    position = row["include"][-1].get("position")
    for _ in range(100):
        boxes = _layout([shape for shape, _ in objects], rng)
        if boxes is None:
            continue
        if position is not None:  # objects are [B, A] for "A <relation> B"
            target, subject = (
                Detection(shape, 1.0, box) for (shape, _), box in zip(objects, boxes)
            )
            if position[0] not in relative_position(subject, target, POSITION_THRESHOLD):
                continue
        return tuple(Figure(shape, color, box) for (shape, color), box in zip(objects, boxes))
    raise RuntimeError(f"shapes: no layout found for {row['prompt']!r} in 100 tries")


def coverage(shape: str, box: tuple[float, ...], height: int, width: int) -> np.ndarray:
    """Fraction [height, width] of each pixel that `shape` covers, its box (x0, y0, x1, y1) in
    pixels: drawn SUPERSAMPLE times larger and box-filtered down, so edges are antialiased."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    # PIL fills both end pixels of a box, hence the - 1 on the far edges.
    x0, y0, x1, y1 = (round(v * SUPERSAMPLE) for v in box)
    x1, y1 = x1 - 1, y1 - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape in ("square", "bar"):
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "cross":
        arm = (x1 - x0 + 1) / 3
        draw.rectangle((x0, round(y0 + arm), x1, round(y1 - arm)), fill=255)
        draw.rectangle((round(x0 + arm), y0, round(x1 - arm), y1), fill=255)
    else:
        raise ValueError(f"shapes: shape {shape!r} is not one of {SHAPES}")
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


def render(scene: tuple[Figure, ...], size: int) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] image, edges antialiased."""
    if size < 16:
        raise ValueError(f"shapes: image size must be >= 16 px, got {size}")
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = BACKGROUND
    for figure in scene:
        alpha = coverage(figure.shape, tuple(v * size for v in figure.box), size, size)[..., None]
        pixels = pixels * (1 - alpha) + np.asarray(PALETTE[figure.color], np.float32) * alpha
    return np.round(pixels).astype(np.uint8)


TRAIN_PROMPTS, EVAL_SEEN = "train_prompts.jsonl", "eval_seen.jsonl"
EVAL_HELD_OUT = "eval_held_out.jsonl"


@dataclass(frozen=True)
class ShapesSet:
    """Paths of a written shapes set: ImageCaptionDataset(jsonl_path, image_dir) and prompt sets
    in GenEval JSONL (load_prompt_set(path, "geneval"))."""

    jsonl_path: Path
    image_dir: Path
    num_images: int
    train_prompts: Path  # every training row: RL prompts
    eval_seen: Path  # evaluation rows of seen compositions
    eval_held_out: Path  # evaluation rows with one held-out composition each


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """GenEval metadata JSONL, one row per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_shapes_set(
    out_dir: str | Path,
    num_images: int,
    split: Split,
    *,
    image_size: int = 32,
    seed: int = 0,
    num_eval_per_tag: int = 16,
) -> ShapesSet:
    """Write (or keep, when already complete) `num_images` training images of the split's
    training rows, a tag drawn uniformly then a row of it, plus the three prompt sets."""
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of 16 px, got {image_size}")
    out_dir = Path(out_dir)
    result = ShapesSet(
        out_dir / INDEX_FILE, out_dir / IMAGE_DIR, num_images,
        out_dir / TRAIN_PROMPTS, out_dir / EVAL_SEEN, out_dir / EVAL_HELD_OUT,
    )  # fmt: skip
    settings = {
        "world": "shapes",
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "num_eval_per_tag": num_eval_per_tag,
        "split_seed": split.seed,
        "held_out": [list(c) for c in sorted(split.held_out)],
    }
    prompt_files = (result.train_prompts, result.eval_seen, result.eval_held_out)
    if is_complete(out_dir, settings) and all(path.is_file() for path in prompt_files):
        return result
    # Partial or different: drop the marker first, so a crash below never looks complete.
    (out_dir / MARKER_FILE).unlink(missing_ok=True)
    result.image_dir.mkdir(parents=True, exist_ok=True)
    for stale in result.image_dir.glob("*.jpg"):
        stale.unlink()
    training = split.training_rows
    seen, held_out = evaluation_rows(split, num_eval_per_tag, seed)
    by_tag = {tag: [row for row in training if row["tag"] == tag] for tag in TAGS}
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(num_images):
        rows = by_tag[TAGS[rng.integers(len(TAGS))]]
        row = rows[rng.integers(len(rows))]
        pixels = render(scene_for(row, rng, split), image_size)
        md5 = hashlib.md5(f"{seed}:{index}:{row['prompt']}".encode()).hexdigest()
        # 4:4:4 chroma: subsampled colour would bleed across the few pixels of a small shape.
        Image.fromarray(pixels).save(result.image_dir / f"{md5}.jpg", quality=95, subsampling=0)
        caption = {"md5": md5, "caption_en": row["prompt"], "bw": image_size, "bh": image_size}
        lines.append(json.dumps(caption))
    write_rows(result.train_prompts, training)
    write_rows(result.eval_seen, seen)
    write_rows(result.eval_held_out, held_out)
    staging = out_dir / f"{INDEX_FILE}.partial"
    staging.write_text("\n".join(lines) + "\n")
    os.replace(staging, result.jsonl_path)
    (out_dir / MARKER_FILE).write_text(json.dumps(settings))
    return result
