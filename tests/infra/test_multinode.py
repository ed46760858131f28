"""Multi-node proof on one machine: a Ray head and a worker node started with `ray start`, jobs submitted with
`ray job submit --working-dir .`, then both nodes stopped.

The head runs with `--num-cpus 0` (the production layout, as in infra/kuberay): job drivers run on it, every
CPU task and actor lands on the worker node. The cache build's driver (planning, manifest commit) therefore
runs on the head while its decode/write tasks and actor pools run on the worker, and the test
checks both from Ray's state API. This test never calls `ray.init`: the cluster is separate from the
in-process Ray of other tests (own temp dir, ports and auth token).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.infra.local_cluster import LocalRayCluster, marked_pids
from tests.short_runs import LAYOUT_MODEL, assert_same_weights, generator_weights, short_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# What `--working-dir .` does not upload: the list of infra/runtime_env.yaml (its env vars are for a real
# cluster, so the jobs here take only the excludes and set their own env vars).
EXCLUDES = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())["excludes"]


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster(head_cpus=0, worker_cpus=2).start()
    try:
        yield c
    finally:
        killed = c.stop()
        left = marked_pids(c.marker)
        c.cleanup_files()
        assert not left, f"processes of the test cluster survived stop(): {left}"
        print(f"multinode cluster stopped ({len(killed)} stragglers needed SIGKILL)")


def _job_ok(cluster: LocalRayCluster, sid: str, run) -> dict:
    info = cluster.job(sid)
    assert info["status"] == "SUCCEEDED", (
        f"job {sid} {info['status']}: {info.get('message')}\nCLI stderr:\n{run.stderr[-3000:]}\n"
        f"job logs:\n{cluster.job_logs(sid)[-6000:]}"
    )
    return info


def test_job_reaches_both_nodes(cluster: LocalRayCluster) -> None:
    """A trivial job: the driver runs on the head, tasks pinned by custom resource run on each node."""
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    sid, run = cluster.submit(
        ["python", "-m", "tests.infra.multinode_probe"],
        working_dir=REPO,
        runtime_env={"env_vars": {"LIDIT_PROBE": "from-runtime-env"}, "excludes": EXCLUDES},
        timeout=300,
    )
    info = _job_ok(cluster, sid, run)
    line = next(ln for ln in cluster.job_logs(sid).splitlines() if ln.startswith("PROBE "))
    probe = json.loads(line[len("PROBE ") :])
    assert probe["driver"] == cluster.head_node_id == info["driver_node_id"]
    assert probe["head_task"] == cluster.head_node_id
    assert probe["worker_tasks"] == [cluster.worker_node_id]
    assert probe["alive_nodes"] == sorted([cluster.head_node_id, cluster.worker_node_id])
    assert probe["cwd_has_repo"], "the entrypoint should run in the uploaded working dir"
    assert probe["probe_env"] == "from-runtime-env"


def test_cache_build_job_on_two_nodes(cluster: LocalRayCluster, starter_micro, tmp_path: Path) -> None:
    """`ray job submit --working-dir . -- python -m pipelines.build configs/starter/cache.yaml ...` builds a
    complete cache: driver on the head, unable to read the model directories; every pipeline task and actor
    (model description, shard writes included) on the worker node."""
    home = cluster.root / "home"  # the job's LIDIT_HOME: ${LIDIT_HOME}/starter is the micro starter set
    home.mkdir()
    (home / "starter").symlink_to(starter_micro.root, target_is_directory=True)
    out = tmp_path / "cache"
    # The head mounts no models (as in infra/kuberay/rayjob-cache.yaml): the driver may not read them; its
    # Ray workers on the worker node may. Sources and the cache root stay readable to both.
    models = ":".join(str(home / "starter" / m) for m in ("vae", "lm_llama", "lm_qwen2"))
    entry = ["python", "-m", "tests.infra.forbid_paths", models, "--"]
    entry += ["pipelines.build", "configs/starter/cache.yaml", "--output", str(out), "--json"]
    for kv in ["rows_per_shard=100", "mlflow=false", "vae_stage.threads=1", "encoder_stage.threads=1"]:
        entry += ["--set", kv]
    sid, run = cluster.submit(
        entry,
        working_dir=REPO,
        runtime_env={"env_vars": {"LIDIT_HOME": str(home)}, "excludes": EXCLUDES},
        timeout=600,
    )
    info = _job_ok(cluster, sid, run)
    logs = cluster.job_logs(sid)

    # The cache is complete: a committed manifest whose shards exist, match their checksums and row counts.
    from lidit.cache.contract import MANIFEST_DIR, Manifest

    manifests = sorted((out / MANIFEST_DIR).glob("v*.json"))
    assert [m.name for m in manifests] == ["v000001.json"]
    manifest = Manifest.model_validate_json(manifests[0].read_text())
    n_train = sum(
        pq.read_metadata(f).num_rows for f in sorted(starter_micro.train_parquet.rglob("*.parquet"))
    )
    assert sum(s.rows for s in manifest.sources) == n_train
    assert len(manifest.shards) == -(-n_train // 100)
    quarantined = 0
    for shard in manifest.shards:
        data = (out / shard.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        assert pq.read_metadata(out / shard.path).num_rows == shard.rows
        quarantined += shard.quarantine_rows
    assert manifest.rows == sum(s.rows for s in manifest.shards) == n_train - quarantined
    assert manifest.rows > 0 and [e.name for e in manifest.encoders] == ["llama", "qwen2"]
    summary = json.loads(next(ln for ln in reversed(logs.splitlines()) if ln.startswith("{")))
    assert summary["rows"] == manifest.rows, summary
    assert "paths unreadable to this process" in logs  # the driver ran (and self-checked) without the models

    # Both nodes did work: the driver on the head (planning, manifest commit), every pipeline task and actor
    # (decode, VAE, encoders, shard writes) on the worker. Only Ray Data's 0-CPU bookkeeping actors may run
    # on the head besides the driver.
    assert info["driver_node_id"] == cluster.head_node_id
    tasks = [t for t in cluster.tasks(info["job_id"]) if t.get("type") != "DRIVER_TASK" and t.get("node_id")]
    stages = ("describe_vae", "describe_encoder", "prepare_unit", "VaeStage", "EncoderStage", "write_shard")
    placed: dict[str, set[str]] = {}
    for t in tasks:
        if any(s in t["name"] for s in stages):
            placed.setdefault(t["name"], set()).add(t["node_id"])
    for stage in stages:
        assert any(stage in name for name in placed), f"no {stage} task recorded; tasks: {sorted(placed)}"
    off = {name: nodes for name, nodes in placed.items() if nodes != {cluster.worker_node_id}}
    assert not off, f"pipeline tasks outside the worker node: {off}"


def test_training_job_on_two_nodes_resumes_after_a_worker_dies(
    cluster: LocalRayCluster, micro_cache: str, tmp_path: Path, straight_weights: dict
) -> None:
    """`ray job submit -- python -m training.train ...`: the driver on the head, unable to read the model
    directories (configs and the MLflow run only); both training workers on the worker node. One worker dies at
    step 6; Ray Train restarts the group from the step-4 checkpoint and the run ends with the weights of an
    uninterrupted run (the suite's one killed-worker test: the same run on one node proves nothing more),
    exported, scored on held-out prompts (rank 0, where the models are) and registered."""
    import mlflow

    from lidit.cache.reader import CacheReader

    starter = Path(CacheReader(micro_cache).vae_path).parent
    home = cluster.root / "train-home"
    home.mkdir()
    config = short_run(
        micro_cache,
        tmp_path / "runs",
        "two-nodes",
        model=LAYOUT_MODEL,
        models_root=str(starter),
        fail_at_step=6,
        tracking={
            "experiment": "test-two-nodes",
            "registered_model": "two-nodes",
            "system_metrics_every_s": 0,
            "eval_starter": str(starter),
            "eval_prompts": 4,
        },
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    models = ":".join(str(starter / m) for m in ("vae", "lm_llama", "lm_qwen2"))
    entry = ["python", "-m", "tests.infra.forbid_paths", models, "--", "training.train", str(path), "--json"]
    sid, run = cluster.submit(
        entry,
        working_dir=REPO,
        runtime_env={"env_vars": {"LIDIT_HOME": str(home), "LIDIT_TRAIN_THREADS": "1"}, "excludes": EXCLUDES},
        timeout=600,
    )
    info = _job_ok(cluster, sid, run)
    logs = cluster.job_logs(sid)
    assert "paths unreadable to this process" in logs  # the driver ran without the models
    assert (tmp_path / "runs" / "two-nodes" / ".failed_once").exists()  # a worker really died at step 6
    summary = json.loads(next(ln for ln in reversed(logs.splitlines()) if ln.startswith("{")))
    assert summary["steps"] == 8 and str(summary["model_version"]) == "1", summary

    assert info["driver_node_id"] == cluster.head_node_id
    workers = [t for t in cluster.tasks(info["job_id"]) if "RayTrainWorker" in t["name"] and t.get("node_id")]
    assert workers and {t["node_id"] for t in workers} == {cluster.worker_node_id}, workers

    # The job's MLflow store: held-out scores on the run, exported EMA weights equal to an uninterrupted run.
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    run_id = summary["mlflow_run_id"]
    client = mlflow.MlflowClient(uri)
    scores = client.get_run(run_id).data.metrics
    # Resumed from the step-4 checkpoint, not from scratch: steps 1-4 are logged once (rank 0 may log the
    # step it was in when its peer died again after the restart), and every step up to 8 is there.
    logged = Counter(m.step for m in client.get_metric_history(run_id, "loss"))
    assert set(logged) == set(range(1, 9)) and all(logged[s] == 1 for s in range(1, 5)), logged
    assert "heldout.overall" in scores and "heldout.cat.colour" in scores, scores
    # Restarted from the step-4 checkpoint, the run ends exactly where the uninterrupted one does.
    assert_same_weights(straight_weights, generator_weights(run_id, tracking_uri=uri))
