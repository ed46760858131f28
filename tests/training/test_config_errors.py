"""Training config errors are caught on the driver before Ray starts or an MLflow run opens: one line naming the
key and what it may be, exit code 2. In-process and Ray-free: starting Ray or MLflow fails the test."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import lidit.cache.reader
import training.data
import training.train
from lidit.config import ConfigError
from training.config import TrainConfig


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("Ray or MLflow started before the config was checked")

    monkeypatch.setattr(training.train, "ensure_ray", forbidden)
    monkeypatch.setattr(training.train, "mlflow_run", forbidden)


class FakeReader:
    """What the driver's checks read from a cache: its encoders, their widths, the VAE's channels."""

    uri = "/caches/fake"
    encoder_names = ["llama", "qwen2"]
    has_layout = False
    has_negatives = False
    manifest = SimpleNamespace(
        encoder=lambda name: SimpleNamespace(hidden_size=32), vae=SimpleNamespace(latent_channels=4)
    )

    def __init__(self, *_: object, **__: object) -> None:
        pass


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("model.preset=XL", "model.preset", "tiny, S, B, LI-DiT-1B, LI-DiT-10B"),
        ("scale.strategy=zero3", "scale.strategy", "'auto', 'fsdp' or 'replicate'"),
        ("model.objective=score", "model.objective", "flow"),
        ("scale.mixed_precision=fp8", "scale.mixed_precision", "'bf16'"),
        ("modle.preset=S", "modle", "unknown key"),
        # The band's floor defaults to 0.7: a ceiling below it leaves the term nothing to apply to.
        ("model.hard_negative_max_sigma=0.5", "model", "above hard_negative_max_sigma"),
    ],
)
def test_bad_value_exits_2_with_one_line(
    override: str, key: str, allowed: str, nothing_starts: None, capsys: pytest.CaptureFixture
) -> None:
    assert training.train.main(["--set", override, "--steps", "3"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert key in lines[0] and allowed in lines[0], lines[0]


@pytest.mark.parametrize(
    ("model", "key", "named"),
    [
        (
            {"encoders": ["llama", "t5"]},
            "model.encoders",
            "t5 not in the cache /caches/fake; choose from llama, qwen2",
        ),
        ({"overrides": {"heads": 5}}, "model.overrides", "divisible by heads 5"),
        ({"overrides": {"depht": 3}}, "model.overrides", "depht"),
        (
            {"hard_negative_weight": 1.0},
            "model.hard_negative_weight",
            "has no negative captions; set a source's negative_caption_column",
        ),
        (
            {"layout_weight": 0.5},
            "model.layout_weight",
            "has no layout targets; set a source's grounding_column",
        ),
    ],
)
def test_cache_dependent_errors_are_raised_before_ray(
    model: dict, key: str, named: str, nothing_starts: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lidit.cache.reader, "CacheReader", FakeReader)
    cfg = TrainConfig.model_validate({"cache": FakeReader.uri, "model": model})
    with pytest.raises(ConfigError) as err:
        training.train.run_training(cfg)
    message = str(err.value)
    assert "\n" not in message and key in message and named in message, message


def test_a_good_config_reaches_ray(nothing_starts: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks pass a valid config through (the fake cache has no rows, so stub the batch check)."""
    monkeypatch.setattr(lidit.cache.reader, "CacheReader", FakeReader)
    monkeypatch.setattr(
        training.data.CacheIndex,
        "build",
        classmethod(lambda cls, reader: SimpleNamespace(check=lambda b: [])),
    )
    cfg = TrainConfig.model_validate({"cache": FakeReader.uri, "model": {"encoders": ["qwen2"]}})
    with pytest.raises(AssertionError, match="Ray or MLflow started"):
        training.train.run_training(cfg)


def test_an_eval_starter_without_held_out_prompts_fails_before_ray(
    nothing_starts: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(lidit.cache.reader, "CacheReader", FakeReader)
    cfg = TrainConfig.model_validate({"cache": FakeReader.uri, "tracking": {"eval_starter": str(tmp_path)}})
    with pytest.raises(
        ConfigError, match=r"tracking.eval_starter: no Parquet shards in .*lidit starter build"
    ):
        training.train.run_training(cfg)


@pytest.mark.parametrize(
    "name", ["train.yaml", "train_long.yaml", "train_long_layout.yaml", "train_shapes.yaml"]
)
def test_starter_recipes_build_their_generator(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every starter recipe validates and its model section builds a generator config."""
    from lidit.config import load_config
    from training.loop import build_generator_config

    monkeypatch.setenv("LIDIT_HOME", "/tmp/lidit-home")
    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[2] / "configs" / "starter" / name, [])
    gen = build_generator_config(cfg, FakeReader())
    assert gen.layout_head == gen.layout_attention == (cfg.model.layout_weight > 0)


def test_a_relative_storage_path_means_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Train (pyarrow's `FileSystem.from_uri`) rejects a relative path; the config resolves it as meant."""
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(storage_path="runs").storage_path == str(tmp_path / "runs")
    assert TrainConfig(storage_path="s3://bucket/runs").storage_path == "s3://bucket/runs"
