"""Every file under infra/ parses, and everything it names exists: `python -m` entry points, `pkg.mod:attr`
import paths, config files. The stage configs under infra/configs validate against the stages' schemas.

Nothing is started: modules are imported (or only located, for entry points) and attributes looked up.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
APP_ROOT = "/home/ray/lidit"  # where infra/Dockerfile puts the repo inside the image
PACKAGES = ("lidit", "pipelines", "training", "serving", "cli")
TOP_DIRS = ("configs", "infra", "lidit", "pipelines", "training", "serving", "cli", "tests", "benchmarks")

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".md", ""})

ENTRY_RE = re.compile(r"python(?:3)? -m ([A-Za-z_][\w.]*)")
IMPORT_RE = re.compile(rf"\b((?:{'|'.join(PACKAGES)})(?:\.\w+)*):([A-Za-z_]\w*)")
# Repo files by extension (labels such as `lidit/pool` are not paths), optionally under the image's APP_ROOT.
PATH_RE = re.compile(
    rf"(?<![\w./-])((?:{re.escape(APP_ROOT)}/)?(?:{'|'.join(TOP_DIRS)})/[\w./-]*\.(?:ya?ml|py|md|json|toml|txt))\b"
)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def docs_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in load_all(p) if isinstance(d, dict) and d.get("kind") == kind]


def _references() -> tuple[set[tuple[str, str]], set[tuple[str, str, str]], set[tuple[str, str]]]:
    """(file, module) entry points, (file, module, attr) import paths, (file, path) repo files named in infra/."""
    entries, imports, paths = set(), set(), set()
    for f in TEXT_FILES:
        text = f.read_text()
        for m in ENTRY_RE.finditer(text):
            entries.add((_rel(f), m.group(1).rstrip(".")))
        for m in IMPORT_RE.finditer(text):
            imports.add((_rel(f), m.group(1), m.group(2)))
        for m in PATH_RE.finditer(text):
            paths.add((_rel(f), m.group(1).removeprefix(APP_ROOT + "/")))
    return entries, imports, paths


ENTRIES, IMPORTS, PATHS = _references()


def test_every_yaml_parses() -> None:
    assert YAML_FILES, "no YAML under infra/"
    for path in YAML_FILES:
        docs = load_all(path)
        assert docs, f"{_rel(path)}: empty"
        for d in docs:
            assert isinstance(d, dict), f"{_rel(path)}: a document is not a mapping"


def test_expected_files_exist() -> None:
    for rel in [
        "infra/README.md",
        "infra/runtime_env.yaml",
        "infra/cluster.yaml",
        "infra/kuberay/rayjob-cache.yaml",
        "infra/kuberay/rayjob-train.yaml",
        "infra/kuberay/rayservice.yaml",
        "infra/configs/cache.yaml",
        "infra/configs/train.yaml",
        "infra/configs/serve.yaml",
    ]:
        assert (REPO / rel).is_file(), rel
    assert any((INFRA / "mlflow").glob("*.yaml"))


def test_references_were_found() -> None:
    """Guard the scanner itself: the stages' entry points and the app builder must be among the references."""
    assert {m for _, m in ENTRIES} >= {"pipelines.build", "training.train"}
    assert ("serving.app", "app_builder") in {(m, a) for _, m, a in IMPORTS}
    assert {"infra/configs/cache.yaml", "infra/configs/train.yaml", "infra/configs/serve.yaml"} <= {
        p for _, p in PATHS
    }


@pytest.mark.parametrize("where,module", sorted(ENTRIES))
def test_entry_points_exist(where: str, module: str) -> None:
    """`python -m X`: X is importable and runnable as a script (a `__main__` guard, or a package `__main__`)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{where}: `python -m {module}`: no such module"
    if module.split(".")[0] not in PACKAGES:
        return  # a third-party tool (pytest, ...): existing is enough
    if spec.submodule_search_locations:  # a package: needs __main__.py
        assert importlib.util.find_spec(f"{module}.__main__") is not None, (
            f"{where}: {module} has no __main__"
        )
    else:
        source = Path(spec.origin).read_text()
        assert "__main__" in source, f"{where}: {module} has no `if __name__ == '__main__'` entry"


@pytest.mark.parametrize("where,module,attr", sorted(IMPORTS))
def test_import_paths_exist(where: str, module: str, attr: str) -> None:
    mod = importlib.import_module(module)
    assert hasattr(mod, attr), f"{where}: {module}:{attr}: {module} has no attribute {attr!r}"


@pytest.mark.parametrize("where,path", sorted(PATHS))
def test_named_paths_exist(where: str, path: str) -> None:
    assert (REPO / path).exists(), f"{where} names {path}, which is not in the repo"


# ---- structure of the manifests ----


def _embedded_yaml(text: str, where: str) -> dict:
    data = yaml.safe_load(text)
    assert isinstance(data, dict), f"{where}: embedded YAML is not a mapping"
    return data


def _runtime_env_vars() -> dict[str, str]:
    return yaml.safe_load((INFRA / "runtime_env.yaml").read_text())["env_vars"]


def _check_cluster_spec(spec: dict, where: str) -> None:
    """Head without Ray CPUs, at least one CPU-only and one GPU worker group, GPU limits = num-gpus."""
    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{where}: the head should run drivers only"
    groups = spec["workerGroupSpecs"]
    gpus = {g["groupName"]: float(g.get("rayStartParams", {}).get("num-gpus", 0)) for g in groups}
    assert any(v == 0 for v in gpus.values()), f"{where}: no CPU-only worker group"
    assert any(v > 0 for v in gpus.values()), f"{where}: no GPU worker group"
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            limit = float(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            assert limit == gpus[g["groupName"]], f"{where}: group {g['groupName']}: GPU limit != num-gpus"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: keep Ray token auth on"


def test_rayjobs() -> None:
    jobs = docs_of_kind("RayJob")
    assert {d["metadata"]["name"] for _, d in jobs} >= {"lidit-cache-build", "lidit-train"}
    shared = _runtime_env_vars()
    for path, doc in jobs:
        where = f"{_rel(path)}:{doc['metadata']['name']}"
        spec = doc["spec"]
        assert ENTRY_RE.search(spec["entrypoint"]), f"{where}: entrypoint is not `python -m ...`"
        env = _embedded_yaml(spec["runtimeEnvYAML"], where)
        for key, value in env.get("env_vars", {}).items():
            if key in shared:
                assert str(value) == str(shared[key]), f"{where}: {key} differs from infra/runtime_env.yaml"
        _check_cluster_spec(spec["rayClusterSpec"], where)


def test_rayservice_points_at_the_app_builder() -> None:
    services = docs_of_kind("RayService")
    assert services
    for path, doc in services:
        where = f"{_rel(path)}:{doc['metadata']['name']}"
        serve_cfg = _embedded_yaml(doc["spec"]["serveConfigV2"], where)
        assert serve_cfg["applications"], where
        for app in serve_cfg["applications"]:
            module, attr = app["import_path"].split(":")
            assert hasattr(importlib.import_module(module), attr), f"{where}: {app['import_path']}"
            config = app.get("args", {}).get("config")
            assert config, f"{where}: the app builder needs args.config"
            assert (REPO / config.removeprefix(APP_ROOT + "/")).is_file(), f"{where}: {config}"
        _check_cluster_spec(doc["spec"]["rayClusterConfig"], where)


def test_runtime_env_is_valid() -> None:
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**data)
    assert {"MLFLOW_TRACKING_URI", "LIDIT_HOME", "LIDIT_S3"} <= set(env["env_vars"])
    assert "working_dir" not in data, "--working-dir . is given on the command line"


def test_cluster_launcher_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0


def test_mlflow_server() -> None:
    deployments = [d for _, d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    assert len(deployments) == 1
    (container,) = deployments[0]["spec"]["template"]["spec"]["containers"]
    args = " ".join(container.get("command", []) + container.get("args", []))
    assert "--backend-store-uri=postgresql://" in args and "--artifacts-destination" in args
    secrets = {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
    declared = {d["metadata"]["name"] for _, d in docs_of_kind("Secret")}
    assert secrets <= declared, f"Secrets used but not templated: {secrets - declared}"
    services = {d["metadata"]["name"] for _, d in docs_of_kind("Service")}
    assert "mlflow" in services
    assert _runtime_env_vars()["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")


# ---- the cluster configs use the stages' schemas ----


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in _runtime_env_vars().items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path))


def test_cache_config_validates(s3_env: None) -> None:
    from pipelines.config import load_build_config

    cfg = load_build_config(INFRA / "configs" / "cache.yaml")
    assert cfg.output.startswith("s3://") and all(s.uri.startswith("s3://") for s in cfg.sources)
    assert cfg.vae_stage.num_gpus > 0 and cfg.encoder_stage.num_gpus > 0 and cfg.decode.num_gpus == 0


def test_train_config_validates(s3_env: None) -> None:
    from lidit.config import load_config
    from training.config import TrainConfig

    cfg = load_config(TrainConfig, INFRA / "configs" / "train.yaml")
    assert cfg.cache.startswith("s3://") and cfg.storage_path.startswith("s3://") and cfg.scale.use_gpu


def test_serve_config_validates(s3_env: None) -> None:
    from lidit.config import load_config
    from serving.config import ServeConfig

    cfg = load_config(ServeConfig, INFRA / "configs" / "serve.yaml")
    assert cfg.model.startswith("models:/")
    d = cfg.deployments
    assert d.encoder.num_gpus > 0 and d.generator.num_gpus > 0 and d.ingress.num_gpus == 0


def _max_replicas(scale: Any) -> int:
    return scale.autoscaling.max_replicas if scale.autoscaling else scale.num_replicas or 1


def test_rayservice_gpu_group_holds_the_serving_deployments(s3_env: None) -> None:
    """The RayService's GPU worker group can hold every GPU replica the serve config may scale to."""
    from lidit.config import load_config
    from serving.config import ServeConfig

    d = load_config(ServeConfig, INFRA / "configs" / "serve.yaml").deployments
    wanted = sum(_max_replicas(s) * s.num_gpus for s in (d.encoder, d.generator, d.ingress))
    ((_, service),) = docs_of_kind("RayService")
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    capacity = sum(g["maxReplicas"] * float(g.get("rayStartParams", {}).get("num-gpus", 0)) for g in groups)
    assert wanted <= capacity, f"serve config may ask for {wanted} GPUs, the RayService has {capacity}"
