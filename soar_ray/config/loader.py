"""Job-file loading: `extends`, overrides, validation errors that name file and field."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from soar_ray.config.base import ConfigError
from soar_ray.config.schema import JobConfig
from soar_ray.config.stages import STAGE_TYPES, Stage


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a job file (following `extends`), apply `a.b.c=value` overrides, validate."""
    path = Path(path)
    tree = _read_job_tree(path, chain=())
    tree.setdefault("name", path.stem)
    for override in overrides:
        _apply_override(tree, override, path)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, overrides)) from None


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML; `load_job` of the text gives back an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _read_job_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The job file's mapping merged over the file it `extends` (mappings merge, rest replaces)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{path}: extends cycle: {cycle}")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: job file not found{where}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8: byte offset {exc.start} (line {line}): {exc.reason}; "
            "save the job file as UTF-8"
        ) from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a job file must be a mapping, got {type(tree).__name__}")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: must be a file path, got {base!r}")
    return _merge(_read_job_tree(path.parent / base, (*chain, resolved)), tree)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {line}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _apply_override(tree: dict[str, Any], override: str, path: Path) -> None:
    """Set `a.b.0.c=value` in the tree, creating missing mappings; list items must exist."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. stages.0.lambda_aux=0")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {exc}") from None
    node: Any = tree
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{path}: override {override!r}: {dotted}: no such item "
                    f"(the list has {len(node)} items)"
                )
            index: int | str = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and node.get(part) is None:
                node[part] = {}  # a missing or null section: the override creates it
        else:
            raise ConfigError(f"{path}: override {override!r}: {dotted}: parent is not a mapping")
        if last:
            node[index] = value
        else:
            node = node[index]


def _describe(exc: ValidationError, path: Path, overrides: Sequence[str]) -> str:
    """One line per error: `file: dotted.field: message (got value)`."""
    keys = [o.partition("=")[0].strip() for o in overrides]
    lines = []
    for error in exc.errors(include_url=False):
        loc, message = _error_message(error)
        dotted = ".".join(str(part) for part in loc)
        origin = [
            o
            for o, k in zip(overrides, keys)
            if f"{dotted}.".startswith(f"{k}.") or f"{k}.".startswith(f"{dotted}.")
        ]
        hint = f" (from override {origin[-1]!r})" if origin else ""
        lines.append(f"{path}: {dotted}: {message}{hint}" if dotted else f"{path}: {message}")
    return "\n".join(lines)


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "multiple_of": "must be a multiple of {multiple_of}",
    "too_short": "must have at least {min_length} item(s)",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "must be a word of letters, digits, '_', '.', '-'",
    "finite_number": "must be a finite number",
}


def _error_message(error: ErrorDetails) -> tuple[tuple[str | int, ...], str]:
    """The dotted location (stage tags dropped) and a short message of one pydantic error."""
    raw_loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    loc = raw_loc[:2] + raw_loc[3:] if raw_loc[:1] == ("stages",) and len(raw_loc) > 2 else raw_loc
    got = f" (got {_short(error['input'])})"
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "extra_forbidden":
        known = _known_fields(raw_loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        return loc, "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
    if kind == "union_tag_not_found":
        return (*loc, "algorithm"), f"required field is missing (one of {list(STAGE_TYPES)})"
    if kind == "union_tag_invalid":
        return (*loc, "algorithm"), f"must be one of {list(STAGE_TYPES)} (got {ctx['tag']!r})"
    if kind == "value_error":
        # Validators write "field.path: text", relative to the model that raised it.
        field, _, text = str(ctx["error"]).partition(": ")
        if re.fullmatch(r"[\w.]+", field) and text:
            return (*loc, *field.split(".")), text
        return loc, str(ctx["error"])
    if kind in _MESSAGES:
        return loc, _MESSAGES[kind].format(**ctx) + got
    return loc, error["msg"] + got


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_fields(loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the section at a raw pydantic location (list indices and keys skipped)."""
    models: list[type[BaseModel]] = [JobConfig]
    for part in loc:
        if isinstance(part, str) and part in STAGE_TYPES and models == models_in_annotation(Stage):
            models = [STAGE_TYPES[part]]
            continue
        inner = [
            model
            for parent in models
            if isinstance(part, str) and part in parent.model_fields
            for model in models_in_annotation(parent.model_fields[part].annotation)
        ]
        models = inner or models
    return sorted({name for model in models for name in model.model_fields})


def models_in_annotation(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds, unwrapping unions, Annotated and containers."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in models_in_annotation(arg)]
