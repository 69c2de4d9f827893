"""Prompt sets: the shared files parse; comments, blanks and bad lines handled with file:line."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from soar_ray.data.prompts import load_prompt_set

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
needs_shared = pytest.mark.skipif(
    not SHARED_PROMPTS.is_dir(), reason=f"shared data folder {SHARED_PROMPTS} is absent"
)


def _at(path: Path, line_no: int) -> str:
    return re.escape(f"{path}:{line_no}: ")


@needs_shared
def test_shared_text_and_ocr_sets() -> None:
    pick = load_prompt_set(SHARED_PROMPTS / "pickscore_test.txt", "text")
    assert len(pick) == 2048 and pick[0].metadata == {}
    assert pick[1].text.startswith("a jung male cyborg with white hair")
    ocr = load_prompt_set(SHARED_PROMPTS / "ocr_test.txt", "ocr")
    assert len(ocr) == 1018  # the last line has no newline
    assert ocr[0].metadata == {"target_text": "Spring Collection 2024"}
    assert ocr[0].source == f"{SHARED_PROMPTS / 'ocr_test.txt'}:1"


@needs_shared
def test_shared_geneval_set_keeps_metadata() -> None:
    path = SHARED_PROMPTS / "geneval_test_metadata.jsonl"
    prompts = load_prompt_set(path, "geneval")
    assert len(prompts) == 2212
    tags = Counter(p.metadata["tag"] for p in prompts)
    assert tags == {
        "color_attr": 400,
        "position": 400,
        "two_object": 396,
        "colors": 376,
        "counting": 320,
        "single_object": 320,
    }
    first = prompts[0]
    assert first.text == "a photo of two wine glasses"
    assert first.metadata == json.loads(path.read_text().splitlines()[0])


def test_text_comments_blanks_and_sources(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# header comment\n\n  a cat on a mat  \n\t# indented comment\r\nsecond\r\n")
    prompts = load_prompt_set(path, "text")
    assert [p.text for p in prompts] == ["a cat on a mat", "second"]
    assert [p.source for p in prompts] == [f"{path}:3", f"{path}:5"]


@pytest.mark.parametrize(
    ("content", "line_no", "message"),
    [
        (b"fine\nbad \x07 bell\n", 2, "control character '\\x07'"),
        (b"fine\n\n\xff\xfe\n", 3, "not UTF-8"),
    ],
)
def test_bad_text_lines_named(tmp_path: Path, content: bytes, line_no: int, message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=_at(path, line_no) + re.escape(message)):
        load_prompt_set(path, "text")


def test_empty_set_and_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no prompts")):
        load_prompt_set(path, "text")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_prompt_set(path, "csv")


@pytest.mark.parametrize("bad", ["no quotes here", 'two "a" and "b"', 'empty ""', 'odd "quote'])
def test_ocr_needs_one_quoted_target(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "ocr.txt"
    path.write_text(f'a sign that says "OPEN"\n# comment\n{bad}\n')
    with pytest.raises(ValueError, match=_at(path, 3) + "an OCR prompt needs exactly one"):
        load_prompt_set(path, "ocr")


GOOD_GENEVAL = {
    "tag": "position",
    "prompt": "a photo of a cow right of a laptop",
    "include": [
        {"class": "laptop", "count": 1},
        {"class": "cow", "count": 1, "position": ["right of", 0]},
    ],
}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"tag": ', "Expecting value"),
        ("[]", "expected a JSON object, got list"),
        ({**GOOD_GENEVAL, "prompt": ""}, "'prompt' must be a non-empty string"),
        ({**GOOD_GENEVAL, "include": []}, "'include' must be a non-empty list"),
        ({**GOOD_GENEVAL, "include": [{"class": "cow", "count": "1"}]}, "include[0] needs a non-"),
        ({**GOOD_GENEVAL, "exclude": [{"count": 2}]}, "exclude[0] needs a string 'class'"),
        (
            {
                **GOOD_GENEVAL,
                "include": [{"class": "cow", "count": 1, "position": ["right of", 0]}],
            },
            "include[0] 'position' must be [relation, index of an earlier include]",
        ),
        (
            {
                **GOOD_GENEVAL,
                "include": [
                    {"class": "a", "count": 1},
                    {"class": "b", "count": 1, "position": ["inside", 0]},
                ],
            },
            "include[1] 'position'",
        ),
    ],
)
def test_bad_geneval_rows_named(tmp_path: Path, row, message: str) -> None:
    path = tmp_path / "geneval.jsonl"
    line = row if isinstance(row, str) else json.dumps(row)
    path.write_text(f"{json.dumps(GOOD_GENEVAL)}\n\n{line}\n")
    with pytest.raises(ValueError, match=_at(path, 3) + re.escape(message)):
        load_prompt_set(path, "geneval")
    path.write_text(f"{json.dumps(GOOD_GENEVAL)}\n\n")
    assert load_prompt_set(path, "geneval")[0].metadata == GOOD_GENEVAL
