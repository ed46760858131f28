"""Start or join the Ray every stage runs on: one helper, one sizing rule.

`lidit/` knows nothing of Ray and `pipelines/`, `training/`, `serving/` never import each other, so the one
place all of them (and the `lidit` command) can share is this small package; it imports only Ray, lazily.

Which Ray (same rule for every stage):
1. Ray already initialised in this process: use it (the caller does not own it).
2. `address` (or `$RAY_ADDRESS`) names a cluster: join it (`auto` = the head `ray start --head` started here).
3. No address (or `local`): start a private local Ray sized by `local_ray_options`.

Joining is never implicit: `ray.init()`'s own default joins *any* Ray running on the machine, a test
session's or another job's included, and a quickstart that joined one died with it ("owner's node has
crashed") when that job ended.
"""

from __future__ import annotations

import logging
import os
from typing import Any

# Logical CPUs of a local Ray: at least 4, so fractional actors (encoders, VAE, train workers) plus the tasks
# that feed them never wait for a CPU on a 2-core laptop (Ray hangs instead of failing when CPUs run out).
MIN_LOCAL_CPUS = 4
DEFAULT_OBJECT_STORE_MB = 150  # Ray's floor is 75 MiB; the stages pass small batches and references
LOCAL = "local"


def verbose() -> bool:
    """`lidit --verbose` (or LIDIT_VERBOSE=1): Ray's own INFO lines on the console."""
    return os.environ.get("LIDIT_VERBOSE", "") not in ("", "0")


def local_ray_options(num_cpus: int | None = None, object_store_mb: int | None = None) -> dict[str, Any]:
    """`ray.init` keyword arguments of a private local Ray (the one sizing rule)."""
    return {
        "num_cpus": num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 2),
        "object_store_memory": (object_store_mb or DEFAULT_OBJECT_STORE_MB) * 2**20,
        "include_dashboard": False,
    }


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = None,
    log_to_driver: bool = True,
) -> bool:
    """Make sure this process is connected to Ray (see the module doc); True when this call started it.

    The caller that gets True owns the instance and shuts it down. `num_cpus` / `object_store_mb` size only a
    Ray this call starts. `log_to_driver=False` keeps worker output in Ray's log files only.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    common = {"log_to_driver": log_to_driver, "logging_level": logging.INFO if verbose() else logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != LOCAL:
        ray.init(address=address, **common)
        return False
    # address=LOCAL keeps ray.init from reading $RAY_ADDRESS or joining a Ray found on the machine.
    ray.init(address=LOCAL, **local_ray_options(num_cpus, object_store_mb), **common)
    return True
