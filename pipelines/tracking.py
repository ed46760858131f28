"""One MLflow run per cache build: config, fingerprints, counts. A record of the build, never part of it."""

from __future__ import annotations

import sys
from typing import Any

from lidit.cache import contract as C
from lidit.config import dump_config
from pipelines.config import CacheBuildConfig


def log_to_mlflow(cfg: CacheBuildConfig, summary: dict[str, Any], manifest: C.Manifest) -> str | None:
    """Log the build; returns the run id. Failures warn and never fail the build."""
    try:
        import mlflow

        from lidit.registry import configure_mlflow

        configure_mlflow(cfg.mlflow_experiment)
        with mlflow.start_run(run_name=f"cache-v{summary['version']}") as run:
            flat = _flatten(dump_config(cfg))
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items() if "storage_options" not in k})
            mlflow.set_tags(
                {"cache_uri": summary["uri"], "cache_version": str(summary["version"])}
                | {f"fingerprint.{k}": v for k, v in summary["fingerprints"].items()}
            )
            metrics = {
                "rows": summary["rows"],
                "quarantined": summary["quarantined_total"],
                "seconds": summary["seconds"],
                "bytes_per_sample": summary["bytes_per_sample"],
            }
            metrics |= {f"computed.{g}": v for g, v in summary["computed"].items()}
            metrics |= {f"reused.{g}": v for g, v in summary["reused"].items()}
            metrics |= {f"quarantined.{r}": v for r, v in summary["quarantined"].items()}
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_dict(manifest.model_dump(mode="json"), "manifest.json")
            mlflow.log_dict(summary, "summary.json")
            return run.info.run_id
    except Exception as exc:  # tracking is a record of the build, not part of it
        print(f"[cache] warning: MLflow logging failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out.update(_flatten(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out
