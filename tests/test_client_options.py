"""ClientOptions: the client's options stated once, checked when made."""

from __future__ import annotations

import dataclasses

import pytest

import felix
from felix.client import ClientOptions
from felix.errors import BadRequest, ConfigError


def test_defaults_and_changes() -> None:
    base = ClientOptions(tenant="acme", pool_size=2)
    changed = ClientOptions.build(base, {"namespace": "prod"})
    assert (changed.tenant, changed.namespace, changed.pool_size) == ("acme", "prod", 2)
    assert ClientOptions.build(None, {}) == ClientOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.tenant = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"pool_sise": 2}, ConfigError, "unknown client option.*pool_sise"),
        ({"pool_size": 0}, ConfigError, "pool_size must be a positive int"),
        ({"max_in_flight": True}, ConfigError, "max_in_flight"),
        ({"request_timeout": 0}, ConfigError, "request_timeout must be positive"),
        ({"keepalive": "10"}, ConfigError, "keepalive"),
        ({"reconnect_backoff": (1.0,)}, ConfigError, "reconnect_backoff"),
        ({"reconnect_backoff": (2.0, 1.0)}, ConfigError, "reconnect_backoff"),
        ({"token": "a", "token_provider": lambda: "b"}, ConfigError, "not both"),
        ({"tenant": "no spaces"}, BadRequest, "tenant"),
    ],
)
def test_bad_options_raise_at_connect(
    changes: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        felix.connect("felix://127.0.0.1:5000", **changes)


def test_connect_takes_an_options_object_and_keywords() -> None:
    options = ClientOptions(tenant="acme")
    connecting = felix.connect("felix://127.0.0.1:5000", options, namespace="prod")
    client = connecting._client
    assert client.options == ClientOptions(tenant="acme", namespace="prod")
    assert (client.tenant, client.namespace) == ("acme", "prod")
