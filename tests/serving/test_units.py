"""No Ray needed: request parsing/validation and config loading."""

from __future__ import annotations

import json
import os

import pytest

from lidit.config import ConfigError, load_config
from serving.api import APIError, parse_request, parse_size
from serving.config import AuthConfig, LimitsConfig, ServeConfig


def _parse(body: dict, **limits) -> object:
    return parse_request(json.dumps(body).encode(), LimitsConfig(**limits), {"m"}, seed=11)


def test_defaults_are_filled_in() -> None:
    job = _parse({"prompt": "  a red circle "})
    assert (job.prompt, job.n, job.width, job.height, job.steps, job.guidance, job.seed) == (
        "a red circle",
        1,
        64,
        64,
        20,
        4.0,
        11,
    )


def test_allowed_sizes_list() -> None:
    limits = LimitsConfig(sizes=["64x64", "96x64"])
    assert parse_size("96x64", limits) == (96, 64)
    with pytest.raises(APIError, match="not served"):
        parse_size("64x96", limits)


def test_bool_is_not_an_int() -> None:
    with pytest.raises(APIError) as exc:
        _parse({"prompt": "a", "n": True})
    assert exc.value.status == 400 and exc.value.param == "n"


def test_starter_config_loads_and_overrides() -> None:
    cfg = load_config(ServeConfig, "configs/starter/serve.yaml", ["port=9001"])
    assert cfg.model == "models:/lidit-starter@production" and cfg.port == 9001
    assert cfg.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ServeConfig, None, ["limits.bogus=1"])


def test_model_uri_parsed_by_the_registry_helper() -> None:
    assert load_config(ServeConfig, None, ["model=models:/m@prod"]).registered_name() == "m"
    assert load_config(ServeConfig, None, ["model=models:/m/3"]).registered_name() == "m"
    assert load_config(ServeConfig, None, ["model=/exports/m"]).registered_name() is None
    with pytest.raises(ConfigError, match="expected models:/NAME@ALIAS"):
        load_config(ServeConfig, None, ["model=models:/only-a-name"])


def test_api_key_from_file_then_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIDIT_API_KEY", "from-env")
    assert AuthConfig().resolve_key() == "from-env"
    (tmp_path / "k").write_text("from-file\n")
    assert AuthConfig(api_key_file=str(tmp_path / "k")).resolve_key() == "from-file"
    monkeypatch.delenv("LIDIT_API_KEY")
    assert AuthConfig().resolve_key() is None
    with pytest.raises(ValueError, match="no key"):
        AuthConfig(required=True).resolve_key()


def test_deployments_scale_apart_from_the_command_line() -> None:
    cfg = load_config(ServeConfig, "configs/starter/serve.yaml", ["deployments.generator.num_replicas=2"])
    assert cfg.deployments.generator.serve_options()["num_replicas"] == 2
    assert cfg.deployments.encoder.serve_options()["num_replicas"] == 1
    auto = load_config(
        ServeConfig,
        None,
        [
            "deployments.encoder.autoscaling.min_replicas=1",
            "deployments.encoder.autoscaling.max_replicas=3",
            "deployments.encoder.autoscaling.target_ongoing_requests=8",
            "deployments.encoder.num_gpus=1",
        ],
    ).deployments.encoder.serve_options()
    assert auto["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 8.0,
    }
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_gpus"] == 1.0
    with pytest.raises(ConfigError, match="not both"):
        load_config(
            ServeConfig,
            None,
            ["deployments.generator.num_replicas=2", "deployments.generator.autoscaling.max_replicas=2"],
        )


def test_admin_key_and_loopback_rule(tmp_path, monkeypatch) -> None:
    from serving.config import AdminConfig, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "myhost"))
    monkeypatch.delenv("LIDIT_ADMIN_KEY", raising=False)
    assert AdminConfig().resolve_key() is None
    monkeypatch.setenv("LIDIT_ADMIN_KEY", "adm")
    assert AdminConfig().resolve_key() == "adm"
    (tmp_path / "a").write_text("adm-file\n")
    assert AdminConfig(key_file=str(tmp_path / "a")).resolve_key() == "adm-file"
    with pytest.raises(FileNotFoundError, match="admin key file"):
        AdminConfig(key_file=str(tmp_path / "missing")).resolve_key()


def test_encoder_fingerprint_is_hashed_once_per_unchanged_checkpoint(tmp_path, monkeypatch) -> None:
    import lidit.encoder
    from lidit.encoder import EncoderConfig, PromptEncoder
    from serving.fingerprints import cached_fingerprint
    from tests.lidit.tiny_lms import build_tiny_lms

    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home"))
    path = build_tiny_lms(tmp_path / "lms")["llama"]
    cfg = EncoderConfig(name="llama", path=str(path))
    first = cached_fingerprint(PromptEncoder(cfg))
    assert first == PromptEncoder(cfg).fingerprint
    with monkeypatch.context() as m:  # a second replica start reads the cache: not one byte hashed
        m.setattr(lidit.encoder, "hash_model_dir", lambda p: pytest.fail("re-hashed an unchanged checkpoint"))
        enc = PromptEncoder(cfg)
        assert cached_fingerprint(enc) == first and enc.fingerprint == first
    config = path / "config.json"  # rewritten in place (new mtime): hashed again
    config.write_text(config.read_text())
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    calls = []
    real = lidit.encoder.hash_model_dir
    monkeypatch.setattr(lidit.encoder, "hash_model_dir", lambda p: calls.append(p) or real(p))
    assert cached_fingerprint(PromptEncoder(cfg)) == first and len(calls) == 1
