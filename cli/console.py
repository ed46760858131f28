"""The console is the tool's own: third-party logs and warnings go to a log file unless `--verbose`.

Set before any heavy import, as environment variables, so processes started later (Ray workers, Serve replicas,
MLflow's own subprocesses) inherit the same policy. Our own `[stage]` lines are plain prints to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Quiet defaults for the libraries whose INFO lines and deprecation notices used to fill the console.
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables...", run links
    "TRANSFORMERS_VERBOSITY": "error",  # deprecation and "accelerate not found" notices
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONWARNINGS": "ignore",  # child processes: their warnings are not the user's to act on
}
ALWAYS_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def log_dir() -> Path:
    """`$LIDIT_HOME/logs` (created), where third-party output goes."""
    from lidit.config import lidit_home  # light: pydantic + yaml

    path = lidit_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


_HANDLER_TAG = "_lidit_console"
# Library loggers that install their own stderr handler at import: re-pointed at the log file when already
# imported (in-process tests, a second command); for later imports the *_LOGGING_LEVEL variables above apply.
LIBRARY_LOGGERS = ("mlflow", "alembic", "ray", "transformers", "diffusers")


def configure(command: str, verbose: bool) -> Path | None:
    """Apply the console policy for one `lidit` invocation; returns the log file (None when verbose)."""
    for key, value in (ALWAYS_ENV if verbose else QUIET_ENV).items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, _HANDLER_TAG, False)]  # idempotent
    if verbose:
        return None
    file = log_dir() / f"{command.replace(' ', '-')}.log"
    handler = logging.FileHandler(file, encoding="utf-8")
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Python warnings (deprecations inside our dependencies) -> the `py.warnings` logger -> the log file only.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").propagate = True
    for name in LIBRARY_LOGGERS:
        if name in sys.modules:
            logger = logging.getLogger(name)
            logger.handlers = [handler]
            logger.propagate = False
    return file
