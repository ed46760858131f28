"""Where encoders and the VAE live: portable `lidit-models://` locations under a models root.

An exported pipeline (`pipeline.json`) must load on another machine, where the LLMs and the VAE sit in another
directory. So an export names each of them relative to a *models root* that every machine configures:

    lidit-models://starter/lm_llama   ->   <models root>/starter/lm_llama

The models root is, in order: an explicit setting (`models_root` of a training or serving config),
`$LIDIT_MODELS_ROOT`, else `LIDIT_HOME` (where `lidit starter build` puts the starter models, under
`starter/`). A model outside the root at export time keeps its absolute path (said once, by the exporter), as
exports made before this scheme did; those still load where the path exists. Fingerprints recorded beside
each location (`lidit.pipeline.check_spec_fingerprints`) make a wrong or changed model a load error, not
silently different features.
"""

from __future__ import annotations

import os
from pathlib import Path

from lidit.config import lidit_home

LOCATION_SCHEME = "lidit-models://"
MODELS_ROOT_ENV = "LIDIT_MODELS_ROOT"


class ModelLocationError(FileNotFoundError):
    """A location in `pipeline.json` does not resolve to a directory on this machine (message is one line)."""


def models_root(configured: str | Path | None = None) -> Path:
    """The models root: `configured`, else `$LIDIT_MODELS_ROOT`, else `LIDIT_HOME` (absolute)."""
    value = configured or os.environ.get(MODELS_ROOT_ENV)
    return Path(value).expanduser().resolve() if value else lidit_home()


def is_portable(location: str) -> bool:
    return location.startswith(LOCATION_SCHEME)


def portable_location(path: str | Path, root: str | Path) -> str:
    """`lidit-models://REL` for a directory under `root`; the absolute path itself for one outside it."""
    if is_portable(str(path)):
        return str(path)
    absolute = Path(path).expanduser().resolve()
    try:
        rel = absolute.relative_to(Path(root).expanduser().resolve())
    except ValueError:
        return str(absolute)
    return LOCATION_SCHEME + rel.as_posix()


def resolve_location(location: str, root: str | Path, what: str) -> str:
    """The local directory of `location` (`what` names the model in the error, e.g. "encoder 'llama'").

    Raises `ModelLocationError` (one line: the location, the root it was looked up in, how to change it) when
    the directory is missing.
    """
    if is_portable(location):
        rel = location[len(LOCATION_SCHEME) :]
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ModelLocationError(f"{what}: {location!r} must name a directory under the models root")
        path = Path(root) / rel
        if not path.is_dir():
            raise ModelLocationError(
                f"{what}: {location} not found under the models root {root} (no directory {path}); "
                f"set {MODELS_ROOT_ENV} (serving: models_root) to the directory that holds it"
            )
        return str(path)
    if not Path(location).is_dir():
        raise ModelLocationError(
            f"{what}: model directory {location} not found (an absolute path recorded at export; re-export "
            f"with the model under {MODELS_ROOT_ENV} to make it portable)"
        )
    return location
