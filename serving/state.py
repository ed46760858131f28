"""The served version as cluster state: what every replica's Serve `user_config` says, and how it is read.

The Serve controller keeps each deployment's `user_config` in its checkpoint and calls `reconfigure` with it on
every replica, including replicas started later (a restarted or autoscaled one). So the version a replica
serves never lives only in its memory:

- TextEncoder / Generator: `{"versions": [current, previous?]}`, the versions to hold loaded. A replica loads
  them in `reconfigure` before it takes traffic (or, on a reload, while it keeps serving what it holds).
- Ingress: `{"model_uri", "current", "previous"?, "switch_at"?}`. Requests admitted before `switch_at` (Unix
  time) are pinned to `previous`, later ones to `current`. A reload pushes this to the ingress replicas one by
  one (Serve rolls lightweight updates out gradually); because every replica switches at the same wall-clock
  instant, not when its own update lands, no client sees the new version and then the old one again.

Torch- and Ray-free: the ingress, the reload logic and unit tests share it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from serving.refs import ModelRef

ENCODER = "TextEncoder"
GENERATOR = "Generator"
INGRESS = "Ingress"


def model_user_config(current: ModelRef, previous: ModelRef | None = None) -> dict[str, Any]:
    """`user_config` of the TextEncoder and Generator: the versions every replica holds loaded."""
    versions = [current] + ([previous] if previous is not None and previous.key != current.key else [])
    return {"versions": [r.to_json() for r in versions]}


def versions_from_user_config(config: dict[str, Any]) -> list[ModelRef]:
    """Inverse of `model_user_config`; the first one is the current version."""
    return [ModelRef.from_json(v) for v in config["versions"]]


@dataclass(frozen=True)
class ServedVersion:
    """What the ingress pins requests to: `current`, or `previous` until `switch_at` (a reload in progress)."""

    model_uri: str
    current: ModelRef
    previous: ModelRef | None = None
    switch_at: float | None = None

    def ref_at(self, now: float | None = None) -> ModelRef:
        """The version a request admitted at `now` (default: this instant) is pinned to."""
        if self.previous is not None and self.switch_at is not None:
            if (time.time() if now is None else now) < self.switch_at:
                return self.previous
        return self.current

    def to_user_config(self) -> dict[str, Any]:
        return {
            "model_uri": self.model_uri,
            "current": self.current.to_json(),
            "previous": self.previous.to_json() if self.previous else None,
            "switch_at": self.switch_at,
        }

    @classmethod
    def from_user_config(cls, config: dict[str, Any]) -> ServedVersion:
        previous = config.get("previous")
        return cls(
            model_uri=config["model_uri"],
            current=ModelRef.from_json(config["current"]),
            previous=ModelRef.from_json(previous) if previous else None,
            switch_at=config.get("switch_at"),
        )
