"""`cluster.ensure_ray`: one rule for starting or joining Ray, used by every stage and the `lidit` command."""

from __future__ import annotations

import os
from typing import Any

from cluster import MIN_LOCAL_CPUS, ensure_ray, local_ray_options


def test_local_sizing_rule() -> None:
    opts = local_ray_options()
    assert opts["num_cpus"] == max(MIN_LOCAL_CPUS, os.cpu_count() or 2)  # never fewer than 4 logical CPUs
    assert opts["object_store_memory"] == 150 * 2**20 and opts["include_dashboard"] is False
    sized = local_ray_options(num_cpus=3, object_store_mb=80)
    assert sized["num_cpus"] == 3 and sized["object_store_memory"] == 80 * 2**20


def test_an_initialised_ray_is_joined_not_owned(ray_local: Any) -> None:
    before = ray_local.get_runtime_context().get_node_id()
    assert ensure_ray(num_cpus=1) is False  # sizes apply only to a Ray this call starts
    assert ray_local.get_runtime_context().get_node_id() == before
    assert ray_local.cluster_resources()["CPU"] == 4  # the fixture's size, untouched
