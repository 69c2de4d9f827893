"""Small synthetic captioned image set in the reference format, so the default job needs no download.

Each image is either a coloured shape on a coloured background ("a red circle on a blue
background") or a sign with a rendered word ('a sign that says "FLOW"'), drawn with PIL at its
bucket size. Output folder: `index.jsonl`, `images/{md5}.jpg` and `synthetic.json`, written last,
recording the settings. md5 is the MD5 of "{seed}:{index}:{caption}" (unique per index, stable).
Everything is a function of the settings, so a folder whose `synthetic.json` matches them and whose
files are all present is complete and left alone; anything else is rebuilt.
"""

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
WORDS = ("FLOW", "RAY", "SOAR", "HELLO", "CAT", "SUN", "OPEN", "STOP", "MAP", "TEA")
INDEX_FILE, IMAGE_DIR, MARKER_FILE = "index.jsonl", "images", "synthetic.json"


@dataclass(frozen=True)
class SyntheticSet:
    """Paths of a generated set, ready for ImageCaptionDataset(jsonl_path, image_dir)."""

    jsonl_path: Path
    image_dir: Path
    num_images: int


def _article(word: str) -> str:
    """Indefinite article for `word` ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` centred at (cx, cy) with outer radius r."""
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return [(cx + dx * r * 0.75, cy + dy * r * 0.75) for dx, dy in corners]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    num_points, inner = (3, 1.0) if shape == "triangle" else (10, 0.45)  # star: 5 tips
    points = []
    for i in range(num_points):
        radius = r if i % 2 == 0 or shape == "triangle" else r * inner
        angle = -math.pi / 2 + 2 * math.pi * i / num_points
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    """A random shape of one colour on a background of another, and its caption."""
    fg, bg = rng.choice(list(COLOURS), size=2, replace=False)
    shape = str(rng.choice(SHAPES))
    img = Image.new("RGB", (width, height), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    r = min(width, height) * rng.uniform(0.25, 0.4)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg])
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=COLOURS[fg])
    return img, f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def _draw_sign(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    """A word in black on a white sign over a coloured background, and its caption."""
    word = str(rng.choice(WORDS))
    bg = str(rng.choice([name for name in COLOURS if name != "white"]))
    img = Image.new("RGB", (width, height), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, width // 5))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x, y = (width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top
    pad = 3
    draw.rectangle((x + left - pad, y + top - pad, x + right + pad, y + bottom + pad), fill="white")
    draw.text((x, y), word, fill=COLOURS["black"], font=font)
    return img, f'a sign that says "{word}"'


def is_complete(out_dir: Path, settings: dict[str, object]) -> bool:
    """The marker matches `settings` and every indexed image exists."""
    marker, index = out_dir / MARKER_FILE, out_dir / INDEX_FILE
    if not marker.is_file() or not index.is_file():
        return False
    try:
        if json.loads(marker.read_text()) != settings:
            return False
        rows = [json.loads(line) for line in index.read_text().splitlines()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a half-written file: the folder is partial and gets rebuilt
    return len(rows) == settings["num_images"] and all(
        (out_dir / IMAGE_DIR / f"{row['md5']}.jpg").is_file() for row in rows
    )


def make_synthetic_set(
    out_dir: str | Path,
    num_images: int = 256,
    *,
    seed: int = 0,
    buckets: Sequence[tuple[int, int]] = ((64, 64), (64, 48)),
    sign_fraction: float = 0.25,
) -> SyntheticSet:
    """Write (or keep, when already complete) a synthetic set of `num_images` images."""
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if not buckets or any(w <= 0 or h <= 0 or w % 16 or h % 16 for w, h in buckets):
        raise ValueError(f"buckets must be positive multiples of 16 px, got {list(buckets)}")
    if not 0.0 <= sign_fraction <= 1.0:
        raise ValueError(f"sign_fraction must be in [0, 1], got {sign_fraction}")
    out_dir = Path(out_dir)
    settings = {
        "num_images": num_images,
        "seed": seed,
        "buckets": [list(b) for b in buckets],
        "sign_fraction": sign_fraction,
    }
    result = SyntheticSet(out_dir / INDEX_FILE, out_dir / IMAGE_DIR, num_images)
    if is_complete(out_dir, settings):
        return result
    # Partial or different: drop the marker first, so a crash below never looks complete.
    (out_dir / MARKER_FILE).unlink(missing_ok=True)
    result.image_dir.mkdir(parents=True, exist_ok=True)
    for stale in result.image_dir.glob("*.jpg"):
        stale.unlink()
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(num_images):
        bw, bh = buckets[index % len(buckets)]
        draw = _draw_sign if rng.random() < sign_fraction else _draw_shape
        img, caption = draw(rng, bw, bh)
        md5 = hashlib.md5(f"{seed}:{index}:{caption}".encode()).hexdigest()
        img.save(result.image_dir / f"{md5}.jpg", quality=95)
        lines.append(json.dumps({"md5": md5, "caption_en": caption, "bw": bw, "bh": bh}))
    staging = out_dir / f"{INDEX_FILE}.partial"
    staging.write_text("\n".join(lines) + "\n")
    os.replace(staging, result.jsonl_path)
    (out_dir / MARKER_FILE).write_text(json.dumps(settings))
    return result
