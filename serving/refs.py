"""Model references: which immutable model version a request is pinned to, and how to get its files.

Torch-free (MLflow is imported lazily), so the ingress replica that resolves aliases stays light.
"""

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lidit.config import lidit_home
from lidit.registry import configure_mlflow, fetch_pipeline, parse_model_uri, resolve_version


@dataclass(frozen=True)
class ModelRef:
    """One immutable model to serve: a registry version (`models:/NAME/VERSION`) or a local export.

    `key` identifies the loaded weights (changes when the alias moves or a local export is rewritten);
    `label` is what clients see (`NAME/VERSION` or the directory name).
    """

    key: str
    uri: str
    label: str
    tracking_uri: str | None = None
    models_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (Serve `user_config` travels through the controller's declarative config)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelRef":
        return cls(**data)


def resolve_ref(model_uri: str, tracking_uri: str | None = None, models_dir: str | None = None) -> ModelRef:
    """Pin `model_uri` now: an alias becomes its current version; a local dir is keyed by its files' mtimes."""
    if parse_model_uri(model_uri):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        name, version = resolve_version(model_uri)  # type: ignore[misc]  # never None for models:/
        pinned = f"models:/{name}/{version}"
        return ModelRef(pinned, pinned, f"{name}/{version}", tracking_uri, models_dir)
    path = Path(model_uri).expanduser().resolve()
    if not (path / "pipeline.json").is_file():
        raise FileNotFoundError(f"{path} is not a LI-DiT pipeline directory (no pipeline.json)")
    stamp = max(p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file())
    return ModelRef(f"{path}@{stamp}", str(path), path.name, tracking_uri, models_dir)


def materialize(ref: ModelRef) -> tuple[Path, Path | None]:
    """A local pipeline dir for `ref`, plus the temp dir to delete once loaded (None for a local export)."""
    if not parse_model_uri(ref.uri):
        return Path(ref.uri), None
    import mlflow

    if ref.tracking_uri:
        mlflow.set_tracking_uri(ref.tracking_uri)
    base = Path(ref.models_dir) if ref.models_dir else lidit_home() / "models"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="serve-", dir=base))  # one per load: replicas never share a dir
    return fetch_pipeline(ref.uri, dst=tmp), tmp


def fetch_spec_json(ref: ModelRef) -> str:
    """The text of `ref`'s `pipeline.json` alone: what the text encoder needs, without the generator weights."""
    from lidit.pipeline import PIPELINE_CONFIG  # lazy: this module stays torch-free for the ingress

    parsed = parse_model_uri(ref.uri)
    if not parsed:
        return (Path(ref.uri) / PIPELINE_CONFIG).read_text()
    import mlflow

    from lidit.registry import PIPELINE_SUBDIRS

    if ref.tracking_uri:
        mlflow.set_tracking_uri(ref.tracking_uri)
    source = mlflow.MlflowClient().get_model_version(parsed.name, parsed.version).source
    with tempfile.TemporaryDirectory(prefix="spec-") as tmp:
        # The layouts `lidit.registry.fetch_pipeline` accepts (root, pipeline/, a pyfunc's artifacts/pipeline/).
        for candidate in (
            f"{source}/{sub}/{PIPELINE_CONFIG}" if sub else f"{source}/{PIPELINE_CONFIG}"
            for sub in PIPELINE_SUBDIRS
        ):
            try:
                return Path(
                    mlflow.artifacts.download_artifacts(artifact_uri=candidate, dst_path=tmp)
                ).read_text()
            except Exception:  # not in this layout (MLflow raises its own or an OSError type per store)
                continue
    raise FileNotFoundError(f"{ref.uri} does not hold a LI-DiT pipeline (no {PIPELINE_CONFIG})")


def tracking_uri_for(uri: str) -> str | None:
    """The tracking URI to pin into refs of registry models (None for a local export).

    `configure_mlflow` also exports MLFLOW_TRACKING_URI, so processes started later inherit it.
    """
    return configure_mlflow() if parse_model_uri(uri) else None
