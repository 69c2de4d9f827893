"""Prompt sets for RL and evaluation.

- text: one prompt per line; surrounding whitespace is stripped, blank lines and lines starting
  with '#' are skipped. A line that is not UTF-8 or holds control characters is a bad line.
- ocr: a text file whose every prompt holds exactly one double-quoted span, the text the image
  must show (OCR reward); kept as metadata {"target_text": ...}.
- geneval: GenEval metadata JSONL, one row `{"tag", "include": [{"class", "count", "color"?,
  "position"?: [relation, index of an earlier include]}], "exclude"?: [{"class", "count"}],
  "prompt"}`; the whole row is the prompt's metadata, as the GenEval scorer needs it.
- drawbench: DrawBench's CSV, a header line with a `Prompts` column (and `Category`, kept as
  metadata {"category": ...}), then a prompt a row.
Every bad line is a ValueError naming the file and the 1-based line; a set with no prompt is an
error too.
"""

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPT_KINDS = ("text", "ocr", "geneval", "drawbench")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Prompt:
    """One prompt, its metadata (GenEval row, OCR target) and where it came from (file:line)."""

    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, decoded line) of every line, raising on bytes that are not UTF-8."""
    lines = []
    for line_no, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        try:
            lines.append((line_no, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from e
    return lines


def _non_empty(path: Path, prompts: list[Prompt]) -> list[Prompt]:
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def load_text_prompts(path: str | Path) -> list[Prompt]:
    """Plain prompts, one per line; blank lines and '#' comments skipped."""
    path = Path(path)
    prompts = []
    for line_no, line in _read_lines(path):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if match := _CONTROL_CHARS.search(text):
            raise ValueError(f"{path}:{line_no}: control character {match.group()!r} in prompt")
        prompts.append(Prompt(text, f"{path}:{line_no}"))
    return _non_empty(path, prompts)


def load_ocr_prompts(path: str | Path) -> list[Prompt]:
    """Text prompts, each with exactly one double-quoted target text."""
    prompts = []
    for prompt in load_text_prompts(path):
        parts = prompt.text.split('"')
        if len(parts) != 3 or not parts[1].strip():
            raise ValueError(
                f"{prompt.source}: an OCR prompt needs exactly one non-empty double-quoted "
                f"target text, got {len(parts) - 1} quote marks"
            )
        prompts.append(Prompt(prompt.text, prompt.source, {"target_text": parts[1]}))
    return prompts


def _check_geneval_row(row: Any) -> None:
    """Raise ValueError describing the first problem with a GenEval metadata row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "tag"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{key!r} must be a non-empty string")
    include, exclude = row.get("include"), row.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise ValueError("'include' must be a non-empty list")
    if not isinstance(exclude, list):
        raise ValueError("'exclude' must be a list")
    for name, items in (("include", include), ("exclude", exclude)):
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("class"), str):
                raise ValueError(f"{name}[{i}] needs a string 'class'")
            count = item.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"{name}[{i}] needs a non-negative integer 'count'")
            if "color" in item and not isinstance(item["color"], str):
                raise ValueError(f"{name}[{i}] 'color' must be a string")
            position = item.get("position")
            if position is not None and not (
                isinstance(position, list)
                and len(position) == 2
                and position[0] in GENEVAL_RELATIONS
                and isinstance(position[1], int)
                and 0 <= position[1] < i
            ):
                raise ValueError(
                    f"{name}[{i}] 'position' must be [relation, index of an earlier include], "
                    f"relation one of {GENEVAL_RELATIONS}; got {position!r}"
                )


def load_geneval_prompts(path: str | Path) -> list[Prompt]:
    """GenEval metadata rows; each prompt keeps its whole row as metadata."""
    path = Path(path)
    prompts = []
    for line_no, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            _check_geneval_row(row)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}:{line_no}: {e}") from e
        prompts.append(Prompt(row["prompt"], f"{path}:{line_no}", row))
    return _non_empty(path, prompts)


def load_drawbench_prompts(path: str | Path) -> list[Prompt]:
    """DrawBench's CSV: the `Prompts` column, each row's `Category` kept as metadata."""
    path = Path(path)
    lines = [(line_no, line) for line_no, line in _read_lines(path) if line.strip()]
    rows = list(csv.reader([line.lstrip("\ufeff") for _, line in lines]))
    header = [name.strip() for name in rows[0]] if rows else []
    if "Prompts" not in header:
        raise ValueError(f"{path}:1: a DrawBench CSV starts with a header naming a Prompts column")
    column = header.index("Prompts")
    category = header.index("Category") if "Category" in header else None
    prompts = []
    for (line_no, _), row in zip(lines[1:], rows[1:]):
        text = row[column].strip() if column < len(row) else ""
        if not text:
            raise ValueError(f"{path}:{line_no}: no prompt in the Prompts column")
        if match := _CONTROL_CHARS.search(text):
            raise ValueError(f"{path}:{line_no}: control character {match.group()!r} in prompt")
        has_category = category is not None and category < len(row)
        metadata = {"category": row[category].strip()} if has_category else {}
        prompts.append(Prompt(text, f"{path}:{line_no}", metadata))
    return _non_empty(path, prompts)


_LOADERS: dict[str, Callable[[str | Path], list[Prompt]]] = {
    "text": load_text_prompts,
    "ocr": load_ocr_prompts,
    "geneval": load_geneval_prompts,
    "drawbench": load_drawbench_prompts,
}


def load_prompt_set(path: str | Path, kind: str) -> list[Prompt]:
    """Load a prompt set of `kind` (one of PROMPT_KINDS)."""
    if kind not in _LOADERS:
        raise ValueError(f"prompt set kind must be one of {PROMPT_KINDS}, got {kind!r}")
    return _LOADERS[kind](path)
