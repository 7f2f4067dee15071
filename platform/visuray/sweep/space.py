"""Search spaces: one entry per job-config key (by its dotted path), checked against the job's config model.

    search_space:
      loss.margin: {type: loguniform, low: 0.05, high: 0.5}
      loss.miner: {type: choice, values: [batch_all, batch_hard, semi_hard]}
      train.p: {type: grid, values: [4, 8]}

Types: ``choice`` (sampled), ``grid`` (every value, crossed with the other grids; ``num_samples``
repeats the whole grid), ``uniform`` / ``loguniform`` (floats), ``randint`` / ``lograndint`` (integers,
``high`` excluded, as in Ray Tune). Everything that can be checked without training is checked before any
trial starts: the key exists in the job's config, the range is not empty, and the job config accepts the
range's end points and every listed value.
"""

from __future__ import annotations

import collections.abc
import difflib
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from visuray.config import ConfigError, StrictModel, apply_values, validate_config

LOG_TYPES = ("loguniform", "lograndint")
LISTED_TYPES = ("choice", "grid")


class ParamSpec(StrictModel):
    type: Literal["choice", "grid", "uniform", "loguniform", "randint", "lograndint"] = Field(
        ..., description="how values are drawn (see the module docstring)"
    )
    values: list[Any] | None = Field(None, description="choice / grid: the values")
    low: float | None = Field(None, description="uniform / loguniform / randint / lograndint: lower bound")
    high: float | None = Field(None, description="upper bound (excluded for randint / lograndint)")

    @model_validator(mode="after")
    def _non_empty(self) -> ParamSpec:
        if self.type in LISTED_TYPES:
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty list of values")
            if self.low is not None or self.high is not None:
                raise ValueError(f"{self.type} takes values, not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"{self.type} takes low/high, not values")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low:g}) must be below high ({self.high:g})")
        if self.type in LOG_TYPES and self.low <= 0:
            raise ValueError(f"{self.type} needs low > 0 (got {self.low:g})")
        if self.type in ("randint", "lograndint"):
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError(f"{self.type} needs integer low and high")
            if self.high - self.low < 1:
                raise ValueError("empty range: randint draws from [low, high), which holds no integer")
        return self

    @property
    def log_scale(self) -> bool:
        return self.type in LOG_TYPES

    def edge_values(self) -> list[Any]:
        """The values a job config must accept: every listed value, or both ends of the range."""
        if self.values is not None:
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.type in ("randint", "lograndint"):
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]

    def to_tune(self) -> Any:
        from ray import tune

        if self.type == "choice":
            return tune.choice(self.values)
        if self.type == "grid":
            return tune.grid_search(self.values)
        assert self.low is not None and self.high is not None
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high))
        return tune.lograndint(int(self.low), int(self.high))


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (``Section``, ``Section | None``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in typing.get_args(annotation) for t in _model_types(arg)]


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if origin in (dict, Mapping):
        return True
    return any(_is_mapping(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def _list_item(annotation: Any) -> Any:
    """The item type of a list annotation (``list[X]``, ``list[X] | None``), else None."""
    if typing.get_origin(annotation) in (list, collections.abc.Sequence):
        return typing.get_args(annotation)[0]
    for arg in typing.get_args(annotation):
        item = _list_item(arg)
        if item is not None:
            return item
    return None


def check_key(model: type[BaseModel], dotted: str) -> None:
    """Raise :class:`ConfigError` unless ``dotted`` names a key of ``model`` (nearest keys suggested).
    A list entry is named by its index: ``labels.groups.2.depth``."""
    annotation: Any = model
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        models, item = _model_types(annotation), _list_item(annotation)
        if item is not None:
            if not part.isdigit():
                raise ConfigError(
                    f"search space: {dotted!r}: {where} is a list; name an entry by its index ({where}.0...)"
                )
            annotation = item
        elif models:
            fields = models[0].model_fields
            if part not in fields:
                known = sorted(fields)
                close = difflib.get_close_matches(part, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; keys there: {', '.join(known)}"
                section = f" in {where}" if where else ""
                raise ConfigError(
                    f"search space: {dotted!r} is not a key of the job config ({part!r}{section}){hint}"
                )
            annotation = fields[part].annotation
        elif _is_mapping(annotation):  # free-form mapping: any sub-key may exist
            return
        else:
            raise ConfigError(f"search space: {dotted!r}: {where} is a value, not a section")
    if _model_types(annotation):  # a section, or a list of sections (a list of values may be swept whole)
        raise ConfigError(f"search space: {dotted!r} is a section or list; name one of its keys")


def check_space(
    model: type[BaseModel], data: Mapping[str, Any], space: Mapping[str, ParamSpec], source: str
) -> None:
    """Every key exists, and the job config validates with each parameter at each of its edge values
    (the other parameters at their first edge value): a bad range fails here, not in trial 7."""
    if not space:
        raise ConfigError(f"invalid config in {source}:\n  search_space: empty; name at least one key")
    for key in space:
        check_key(model, key)
    base = {key: (key.split("."), spec.edge_values()[0]) for key, spec in space.items()}
    for key, spec in space.items():
        for value in spec.edge_values():
            values = {**base, key: (key.split("."), value)}
            try:
                validate_config(model, apply_values(data, values), f"{source} (search_space.{key}={value!r})")
            except ConfigError as exc:
                raise ConfigError(f"search space: the job config rejects {key}={value!r}:\n{exc}") from None
