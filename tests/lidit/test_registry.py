"""`models:/` URIs are parsed in one place (`lidit.registry.parse_model_uri`), without MLflow."""

from __future__ import annotations

import pytest

from lidit.registry import ModelURI, parse_model_uri


def test_alias_version_and_local_paths() -> None:
    assert parse_model_uri("models:/lidit-starter@production") == ModelURI(
        "lidit-starter", alias="production"
    )
    assert parse_model_uri("models:/lidit-starter/3") == ModelURI("lidit-starter", version="3")
    assert (
        str(parse_model_uri("models:/m@a")) == "models:/m@a"
        and str(ModelURI("m", version="2")) == "models:/m/2"
    )
    assert parse_model_uri("/exports/pipeline") is None and parse_model_uri("runs:/abc/pipeline") is None


@pytest.mark.parametrize(
    "uri", ["models:/", "models:/name", "models:/@prod", "models:/name@", "models:/a/b/3"]
)
def test_malformed_registry_uris_are_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS"):
        parse_model_uri(uri)


def test_registered_name_is_none_for_paths_and_malformed_uris() -> None:
    from lidit.registry import registered_name

    assert registered_name("models:/lidit-starter@production") == "lidit-starter"
    assert registered_name("models:/lidit-starter/3") == "lidit-starter"
    assert registered_name("/exports/lidit-starter") is None
    assert registered_name("models:/no-tag") is None
