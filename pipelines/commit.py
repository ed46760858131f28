"""Commit a cache version: assemble the manifest from the plan and the shard entries, write it last.

A version is committed only when its content differs from the latest one (a rerun that changed nothing commits
nothing). The manifest write is the commit point: readers follow manifests only.
"""

from __future__ import annotations

import datetime as dt

from lidit.cache import contract as C
from lidit.cache.storage import Location
from pipelines.plan import Plan


class CommitConflictError(RuntimeError):
    """Another build committed the version this one was about to commit (an operational failure, not a bug)."""

    hint = "rerun the build: it reuses every shard already written and commits the next version"


def assemble_manifest(plan: Plan, shards: list[C.ShardEntry], encoders: list[C.EncoderEntry]) -> C.Manifest:
    """The manifest of the plan's version over `shards` (in output order) and the completed encoder entries."""
    qcounts: dict[str, int] = {}
    for s in shards:
        for reason, n in s.quarantine_counts.items():
            qcounts[reason] = qcounts.get(reason, 0) + n
    return C.Manifest(
        version=(plan.previous.version + 1) if plan.previous else 1,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        rows=sum(s.rows for s in shards),
        sources=plan.sources,
        image=plan.spec.image,
        vae=plan.vae,
        encoders=encoders,
        shards=shards,
        quarantine_counts=dict(sorted(qcounts.items())),
    )


def is_new_content(plan: Plan, manifest: C.Manifest) -> bool:
    return plan.previous is None or plan.previous.content_key() != manifest.content_key()


def commit_manifest(out: Location, manifest: C.Manifest) -> None:
    """Write `manifest` as its version, or raise `CommitConflictError` if another build got there first.

    The write itself is the arbiter (create-only: `If-None-Match: *` on S3, a hard link locally), so of two
    builds that planned on the same latest version exactly one commits; no check-then-write.
    """
    conflict = CommitConflictError(
        f"{out.uri}: version {manifest.version} was committed by another build meanwhile"
    )
    try:
        out.write_bytes_exclusive(
            out.join(C.manifest_name(manifest.version)), manifest.model_dump_json(indent=1).encode()
        )
    except FileExistsError:
        raise conflict from None
