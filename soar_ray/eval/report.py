"""What an evaluation folder holds besides its images: `scores.parquet` (a row an image, every
reward and component), `summary.json` and the printed table (mean per reward and component;
GenEval's overall, per-tag and strict accuracy when a GenEval-style reward ran), a captioned sample
grid and a static `index.html` gallery that a browser opens from disk."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rewards.geneval import tag_accuracy
from soar_ray.cluster.rewards import PoolOutput
from soar_ray.data.prompts import Prompt
from soar_ray.eval.sampling import EvalItem
from soar_ray.metrics import save_image_grid

IMAGE_DIR, SCORES_FILE, SUMMARY_FILE = "images", "scores.parquet", "summary.json"
GRID_FILE, GALLERY_FILE = "grid.png", "index.html"
GENEVAL_STRICT, GENEVAL_ACCURACY = "geneval_strict", "geneval_accuracy"
MAX_GRID_IMAGES = 32


def score_rows(
    prompts: Sequence[Prompt], items: Sequence[EvalItem], output: PoolOutput
) -> list[dict[str, Any]]:
    """One row an image: where it is, its prompt, and every reward and component (NaN where a
    reward dropped the image)."""
    kept = output.kept
    rows = []
    for j, item in enumerate(items):
        prompt = prompts[item.prompt_index]
        row = {
            "image": f"{IMAGE_DIR}/{item.name}.png", "prompt_index": item.prompt_index,
            "sample": item.sample, "seed": item.seed, "prompt": prompt.text,
            "tag": prompt.metadata.get("tag"), "dropped": not bool(kept[j]),
        }  # fmt: skip
        row |= {name: float(values[j]) for name, values in output.components.items()}
        rows.append(row)
    return rows


def write_scores(rows: list[dict[str, Any]], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def geneval_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """GenEval's numbers: strict accuracy per tag, `overall` (the mean over tags, as GenEval
    reports it), and over all images the strict accuracy and the fraction of requirements met."""
    scored = [r for r in rows if not r["dropped"] and r.get("tag")]
    per_tag = tag_accuracy([(r["tag"], r[GENEVAL_STRICT]) for r in scored])
    return {
        "overall": float(np.mean(list(per_tag.values()))),
        "per_tag": per_tag,
        "strict": float(np.mean([r[GENEVAL_STRICT] for r in scored])),
        "accuracy": float(np.mean([r[GENEVAL_ACCURACY] for r in scored])),
    }


def summarize(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    """Mean and std of every score column over the images no reward dropped."""
    kept = [r for r in rows if not r["dropped"]]
    summary: dict[str, Any] = {"num_images": len(rows), "num_dropped": len(rows) - len(kept)}
    summary["scores"] = {
        name: {"mean": float(np.mean([r[name] for r in kept])) if kept else float("nan"),
               "std": float(np.std([r[name] for r in kept])) if kept else float("nan")}
        for name in columns
    }  # fmt: skip
    if GENEVAL_STRICT in columns and any(r.get("tag") for r in kept):
        summary["geneval"] = geneval_summary(rows)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as aligned text lines (what `soar-ray eval` prints)."""
    width = max(len(name) for name in summary["scores"]) + 2
    lines = [f"{'score':<{width}}{'mean':>10}{'std':>10}"]
    for name, stats in summary["scores"].items():
        lines.append(f"{name:<{width}}{stats['mean']:>10.4f}{stats['std']:>10.4f}")
    if "geneval" in summary:
        gen = summary["geneval"]
        lines.append(f"GenEval overall {gen['overall']:.4f}  (strict {gen['strict']:.4f}, "
                     f"requirements met {gen['accuracy']:.4f})")  # fmt: skip
        lines += [f"  {tag:<16}{value:.4f}" for tag, value in gen["per_tag"].items()]
    lines.append(f"{summary['num_images']} images, {summary['num_dropped']} dropped")
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], settings: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps({"settings": settings, **summary}, indent=2) + "\n")
    return path


def write_grid(out: Path, rows: Sequence[dict[str, Any]], first_score: str | None) -> Path:
    """A captioned grid of the first images (prompt-major), captioned with the first reward."""
    from PIL import Image

    shown = rows[:MAX_GRID_IMAGES]
    images = np.stack([np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in shown])
    captions = [
        (f"{r[first_score]:.3f} " if first_score else "") + r["prompt"] for r in shown
    ]  # fmt: skip
    return save_image_grid(images, out / GRID_FILE, captions=captions)


def write_gallery(out: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  title: str) -> Path:  # fmt: skip
    """index.html: one card an image (the image, its prompt, every score), no server needed."""
    cards = []
    for row in rows:
        scores = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{row[name]:.4f}</td></tr>" for name in columns
        )
        cards.append(
            f'<figure><img src="{html.escape(row["image"])}" loading="lazy">'
            f"<figcaption><b>{row['prompt_index']}.{row['sample']}</b> "
            f"{html.escape(row['prompt'])}<table>{scores}</table></figcaption></figure>"
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 1em; }}
figure {{ margin: 0; }} img {{ width: 100%; image-rendering: pixelated; }}
figcaption {{ font-size: 12px; }} td {{ padding: 0 .5em 0 0; }}
</style></head>
<body><h1>{html.escape(title)}</h1><main>
{chr(10).join(cards)}
</main></body></html>
"""
    path = out / GALLERY_FILE
    path.write_text(page)
    return path
