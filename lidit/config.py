"""Typed configs loaded from YAML with `--set key=value` overrides, and the local state root.

All default local state lives under one root, `LIDIT_HOME` (default `./.lidit`), so a run is isolated by
setting one variable. MLflow follows its own convention: `MLFLOW_TRACKING_URI` wins when set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid config (message is user-facing)."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def lidit_home() -> Path:
    """Root of all default local state (`$LIDIT_HOME`, default `./.lidit`), created on first use."""
    home = Path(os.environ.get("LIDIT_HOME", ".lidit")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def mlflow_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI` when set, else a SQLite store under `LIDIT_HOME/mlflow`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = lidit_home() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Where a local store keeps artifacts (`LIDIT_HOME/mlflow/artifacts`); ignored by a remote server."""
    path = lidit_home() / "mlflow" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn `["a.b=1", "c=[x, y]"]` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value (e.g. model.preset=tiny)")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: value is not valid YAML: {exc}") from exc
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(value: Any) -> Any:
    """Expand `${VAR}` in every string of a nested config structure: the one expansion policy.

    - Only the braced form: a bare `$` is text (prompts, instructions and comments may hold one).
    - Expanded in values, after `--set` overrides are merged, so overrides may use `${VAR}` too; YAML
      comments and keys are never touched.
    - `${LIDIT_HOME}` is always defined (the state root, `lidit_home()`); any other variable must be set:
      an unset one is a ConfigError naming it (a silent literal `${X}` path fails later, far from the cause).
    """
    if isinstance(value, dict):
        return {k: expand_vars(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [expand_vars(v) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "LIDIT_HOME":
            return str(lidit_home())
        if name not in os.environ:
            raise ConfigError(
                f"config uses ${{{name}}} but the environment variable is not set (export {name}=...)"
            )
        return os.environ[name]

    return _VAR.sub(sub, value)


def read_yaml_mapping(path: str | os.PathLike, expand: bool = True) -> dict[str, Any]:
    """A YAML config file's top-level mapping, with readable errors; `${VAR}`s expanded unless `expand=False`
    (callers that merge overrides first expand afterwards, see `load_config`)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(loaded).__name__}")
    return expand_vars(loaded) if expand else loaded


def load_config(
    cls: type[ModelT], path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> ModelT:
    """Load `cls` from a YAML file (optional) plus `key=value` overrides, with readable errors."""
    data = read_yaml_mapping(path, expand=False) if path is not None else {}
    data = expand_vars(deep_merge(data, parse_overrides(overrides)))
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(cls, exc, path)) from exc


def format_validation_error(cls: type[BaseModel], exc: ValidationError, path: Any = None) -> str:
    """One line per problem: `key.path: message (got value)`."""
    where = f" in {path}" if path else ""
    lines = [f"invalid {cls.__name__} config{where}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """Plain JSON-able dict of a config (for MLflow params, manifests and summaries)."""
    return cfg.model_dump(mode="json")
