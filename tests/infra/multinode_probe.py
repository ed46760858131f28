"""A trivial Ray job for the multi-node test: one task pinned to each node by custom resource.

Run by `ray job submit ... -- python -m tests.infra.multinode_probe`; prints one `PROBE {json}` line.
"""

from __future__ import annotations

import json
import os

import ray


@ray.remote(num_cpus=0, resources={"head_node": 0.01})
def on_head() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0.5, resources={"worker_node": 0.01})
def on_worker() -> str:
    return ray.get_runtime_context().get_node_id()


def main() -> None:
    ray.init()
    ctx = ray.get_runtime_context()
    result = {
        "driver": ctx.get_node_id(),
        "head_task": ray.get(on_head.remote()),
        "worker_tasks": sorted(set(ray.get([on_worker.remote() for _ in range(4)]))),
        "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "cwd_has_repo": os.path.isfile("pyproject.toml"),
        "probe_env": os.environ.get("LIDIT_PROBE"),
    }
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
