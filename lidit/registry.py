"""MLflow glue shared by training (register) and serving (resolve): one place for the registry contract.

Contract: a registered model version's source holds a pipeline directory (`pipeline.json` + `generator/`, see
`lidit.pipeline`) at one of `PIPELINE_SUBDIRS`; training registers an MLflow pyfunc model directory with the
pipeline under `artifacts/pipeline/` (`lidit.pyfunc`), so `mlflow.pyfunc.load_model` loads it too. Lineage lives in version tags (`cache_manifest`,
`encoder.<name>`, `vae`, `git_commit`). Serving asks for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or a
local export directory.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lidit.config import lidit_home, mlflow_artifact_root, mlflow_tracking_uri

PIPELINE_ARTIFACT = "pipeline"
MODELS_SCHEME = "models:/"
# Where pipeline.json sits inside a version's source: at the root (a plain export), under pipeline/, or under
# artifacts/pipeline/ of an MLflow pyfunc model directory (what training registers, see lidit.pyfunc).
PIPELINE_SUBDIRS = ("", PIPELINE_ARTIFACT, f"artifacts/{PIPELINE_ARTIFACT}")


@dataclass(frozen=True)
class ModelURI:
    """A parsed registry reference: `models:/NAME@ALIAS` (alias set) or `models:/NAME/VERSION` (version set)."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return (
            f"{MODELS_SCHEME}{self.name}@{self.alias}"
            if self.alias
            else f"{MODELS_SCHEME}{self.name}/{self.version}"
        )


def parse_model_uri(uri: str) -> ModelURI | None:
    """`models:/NAME@ALIAS` / `models:/NAME/VERSION` -> ModelURI; None for anything else (a local path).

    The one parser of registry URIs (training, serving and the CLI all go through it). Pure string work: no
    MLflow import. Raises ValueError on a malformed `models:/` URI.
    """
    if not uri.startswith(MODELS_SCHEME):
        return None
    ref = uri[len(MODELS_SCHEME) :]
    name, sep, tag = ref.partition("@") if "@" in ref else ref.rpartition("/")
    if not name or not tag or "/" in name:
        raise ValueError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return ModelURI(name, alias=tag) if sep == "@" else ModelURI(name, version=tag)


def registered_name(uri: str) -> str | None:
    """NAME of a well-formed `models:/` URI; None for a local path or a malformed URI."""
    try:
        parsed = parse_model_uri(uri)
    except ValueError:
        return None
    return parsed.name if parsed else None


def configure_mlflow(experiment: str | None = None) -> str:
    """Point MLflow at `mlflow_tracking_uri()`; create `experiment` with artifacts under LIDIT_HOME when local.

    Returns the tracking URI. Safe to call repeatedly and from any process.
    """
    import mlflow

    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    if experiment:
        client = mlflow.MlflowClient()
        if client.get_experiment_by_name(experiment) is None:
            location = mlflow_artifact_root() + f"/{experiment}" if uri.startswith("sqlite") else None
            try:
                client.create_experiment(experiment, artifact_location=location)
            except Exception:  # created concurrently by another process
                if client.get_experiment_by_name(experiment) is None:
                    raise
        mlflow.set_experiment(experiment)
    return uri


def register_pipeline(
    run_id: str, name: str, tags: dict[str, str] | None = None, alias: str | None = None
) -> str:
    """Register the pipeline directory logged under `PIPELINE_ARTIFACT` of `run_id`; returns the version."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="LI-DiT generator pipeline (refiners + DiT)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{PIPELINE_ARTIFACT}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def resolve_version(model_uri: str) -> tuple[str, str] | None:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (name, version); None for a local path."""
    parsed = parse_model_uri(model_uri)
    if parsed is None:
        return None
    if parsed.version is not None:
        return parsed.name, parsed.version
    import mlflow

    configure_mlflow()  # the LIDIT_HOME store unless MLFLOW_TRACKING_URI says otherwise
    client = mlflow.MlflowClient()
    return parsed.name, str(client.get_model_version_by_alias(parsed.name, parsed.alias).version)


def fetch_pipeline(model_uri: str, dst: str | Path | None = None) -> Path:
    """A local pipeline directory for `model_uri` (registry URI, runs:/ URI or local directory)."""
    local = Path(model_uri)
    if "://" not in model_uri and parse_model_uri(model_uri) is None:
        if not (local / "pipeline.json").is_file():
            raise FileNotFoundError(f"{local} is not a LI-DiT pipeline directory (no pipeline.json)")
        return local
    import mlflow

    resolved = resolve_version(model_uri)
    if dst is None:
        base = lidit_home() / "models"
        base.mkdir(parents=True, exist_ok=True)
        label = f"{resolved[0]}-v{resolved[1]}" if resolved else "download"
        dst = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=base))
    uri = f"models:/{resolved[0]}/{resolved[1]}" if resolved else model_uri
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    found = find_pipeline_dir(path)
    if found is None:
        raise FileNotFoundError(f"{model_uri} does not hold a LI-DiT pipeline (no pipeline.json)")
    return found


def find_pipeline_dir(path: str | Path) -> Path | None:
    """The pipeline directory inside a downloaded version source (one of `PIPELINE_SUBDIRS`), or None."""
    root = Path(path)
    return next((root / sub for sub in PIPELINE_SUBDIRS if (root / sub / "pipeline.json").is_file()), None)


def git_commit() -> str:
    """The repository's commit for lineage tags ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
