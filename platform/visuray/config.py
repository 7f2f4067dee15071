"""Configs: pydantic models loaded from YAML, with dotted command-line overrides.

Every config model derives from :class:`StrictModel`, so an unknown key is an error that names the key
(a typo never silently falls back to a default). :func:`load_config` reports errors with the file they
came from, and with ``(command line)`` for keys that came from an override.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from visuray.errors import VisurayError

T = TypeVar("T", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; accept exponent floats without a dot, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(VisurayError, ValueError):
    """A config file or override that cannot be used; the message names the key and its source."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``train.lr=3e-4`` into (["train", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``dotted.key=value`` override applied.

    Intermediate mappings are created when missing so that validation (not this function) decides
    whether the key exists: the resulting error then names the full dotted key.
    """
    return apply_values(data, {item: parse_override(item) for item in overrides})


def apply_values(data: Mapping[str, Any], values: Mapping[str, tuple[list[str], Any]]) -> dict[str, Any]:
    """A deep copy of ``data`` with ``{label: (dotted path parts, value)}`` set; ``label`` names the
    source of a value in errors (the override as typed, or a sweep's parameter)."""
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for label, (path, value) in values.items():
        node: dict[str, Any] | list[Any] = result
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                child = node[_list_index(node, part, label, path[:i])]
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, dict | list):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override {label!r}: {where} is a value, not a section")
            node = child
        if isinstance(node, list):
            node[_list_index(node, path[-1], label, path[:-1])] = value
        else:
            node[path[-1]] = value
    return result


def _list_index(items: list[Any], part: str, label: str, where: list[str]) -> int:
    """``part`` as an index into ``items`` (a list in the config: ``labels.groups.2.depth``)."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {label!r}: {'.'.join(where)} is a list of {len(items)}; {part!r} is not an index into it"
        )
    return int(part)


def _format_validation_error(exc: ValidationError, source: str, overridden: set[str]) -> str:
    lines = [f"invalid config in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        origin = " (command line)" if key in overridden else ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
        lines.append(f"  {key}{origin}: {msg}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def validate_config(
    model: type[T], data: Mapping[str, Any], source: str = "<config>", overrides: Sequence[str] = ()
) -> T:
    """Validate ``data`` (with overrides applied) into ``model``; raise :class:`ConfigError` on failure."""
    merged = apply_overrides(data, overrides)
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, overridden)) from None


def load_config(model: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load ``model`` from a YAML file (or from defaults when ``path`` is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    return validate_config(model, data, str(path) if path is not None else "<defaults>", overrides)


def without_credentials(data: Any) -> Any:
    """A copy of dumped config ``data`` with storage credentials (``key`` and ``secret`` of every section that
    has a ``secret``) set to null: what is written beside artifacts must not leak them, and a run reproduced
    from it takes its credentials from the environment (or the instance profile) as it should."""
    if isinstance(data, dict):
        out = {k: without_credentials(v) for k, v in data.items()}
        if "secret" in out:
            out["secret"] = None
            if "key" in out:
                out["key"] = None
        return out
    if isinstance(data, list):
        return [without_credentials(v) for v in data]
    return data


def config_to_yaml(cfg: BaseModel, keep_credentials: bool = False) -> str:
    """The resolved config as YAML, saved next to every artifact so a run can be reproduced; storage
    credentials are nulled unless ``keep_credentials`` (a job submission that must pass them on)."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(data if keep_credentials else without_credentials(data), sort_keys=False)
