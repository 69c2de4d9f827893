"""Building blocks of the job schema: constrained field types, `Section`, `ConfigError`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Count = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
# 16 px = VAE factor 8 x transformer patch 2: the smallest image step SD3 can take.
Pixels = Annotated[int, Field(ge=16, multiple_of=16)]
Word = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Precision = Literal["bf16", "fp16", "fp32"]


class ConfigError(ValueError):
    """A job file, override or path that is not valid; the message names file and field."""


class Section(BaseModel):
    """Base of every section: frozen, unknown keys refused, field docstrings are descriptions."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        coerce_numbers_to_str=True,
        validate_default=True,
    )


def format_path(template: str, field: str, **values: object) -> str:
    """Fill the `{placeholder}`s of a path template; an unknown one names the field."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{field}: bad placeholder in {template!r} ({exc}); allowed: {sorted(values)}"
        ) from exc
