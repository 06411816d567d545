"""API keys in-process (proxy/auth.py): which role each key gets, what is refused, how keys are read
from api_tokens.yml and from headers. The same rules on the live path are in test_auth.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from proxy.auth import KeyRing, Principal, Role, key_from_headers, mint_token
from proxy.errors import ConfigError, Forbidden, Unauthorized

RING = KeyRing(user_keys=(b"user-key-1", b"user-key-2"), admin_keys=(b"admin-key", b"admin-key-2"))


def test_each_key_gets_its_role_and_nothing_else_does() -> None:
    assert RING.role_of("user-key-1") is Role.USER
    assert RING.role_of("user-key-2") is Role.USER  # not only the last key of a list
    assert RING.role_of("admin-key") is Role.ADMIN
    assert RING.role_of("admin-key-2") is Role.ADMIN
    for wrong in (None, "", "user-key-", "user-key-1x", "USER-KEY-1", "admin-key-", "admin", "admin-key-3", " "):
        assert RING.role_of(wrong) is Role.NONE, wrong


def test_a_ring_with_only_user_or_only_admin_keys_is_closed() -> None:
    users = KeyRing(user_keys=(b"u",))
    admins = KeyRing(admin_keys=(b"a",))
    assert not users.open and not admins.open
    assert users.role_of(None) is Role.NONE and users.role_of("u") is Role.USER and users.role_of("a") is Role.NONE
    assert admins.role_of(None) is Role.NONE and admins.role_of("a") is Role.ADMIN and admins.role_of("u") is Role.NONE


def test_no_keys_at_all_is_an_open_proxy() -> None:
    ring = KeyRing()
    assert ring.open
    assert ring.role_of(None) is Role.ADMIN and ring.role_of("anything") is Role.ADMIN
    assert ring.require(None, Role.ADMIN) is Role.ADMIN


def test_require_refuses_with_the_right_error() -> None:
    with pytest.raises(Unauthorized) as missing:
        RING.require(None, Role.USER)
    assert missing.value.message == "missing API key"
    with pytest.raises(Unauthorized) as invalid:
        RING.require("nope", Role.USER)
    assert invalid.value.message == "invalid API key"
    with pytest.raises(Forbidden) as forbidden:
        RING.require("user-key-1", Role.ADMIN)
    assert forbidden.value.message == "this endpoint needs an admin key"
    assert RING.require("user-key-1", Role.USER) is Role.USER
    assert RING.require("admin-key", Role.USER) is Role.ADMIN  # an admin key is valid wherever a user key is
    assert RING.require("admin-key", Role.ADMIN) is Role.ADMIN


def test_keys_from_a_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    with pytest.raises(ConfigError) as missing:  # no file: a typo in its name must not run the proxy open
        KeyRing.load(path)
    assert missing.value.file == str(path) and "does not exist" in missing.value.problem
    path.write_text("")
    assert KeyRing.load(path).open  # an empty file: open
    path.write_text("api_key: [u1, '', u2]\nadmin_key: a1\n")
    ring = KeyRing.load(path)
    assert ring == KeyRing(user_keys=(b"u1", b"u2"), admin_keys=(b"a1",))  # empty keys are dropped
    assert ring.role_of("") is Role.NONE
    path.write_text("api_key: [only-user]\n")
    assert KeyRing.load(path) == KeyRing(user_keys=(b"only-user",))
    path.write_text("admin_key: ['']\n")
    assert KeyRing.load(path).open  # a list of empty keys is no key at all


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("api_key: [unclosed\n", "not valid YAML"),
        ("api_keys: [typo]\n", "api_keys"),
        ("api_key: 12345\n", "Expected"),
        ("- a list\n", "Expected"),
    ],
)
def test_a_bad_tokens_file_names_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        KeyRing.load(path)
    assert info.value.file == str(path) and problem in info.value.problem
    assert str(info.value).startswith(f"{path}: {info.value.problem[:12]}")  # the file, then what is wrong


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer k1"}, "k1"),
        ({"authorization": "bearer k1"}, "k1"),
        ({"authorization": "BEARER   k1 "}, "k1"),
        ({"x-api-key": "k2"}, "k2"),
        ({"authorization": "Bearer k1", "x-api-key": "k2"}, "k1"),
        ({"authorization": "Basic k1", "x-api-key": "k2"}, "k2"),  # not a bearer token: x-api-key decides
        ({"authorization": "Basic k1"}, None),
        ({"authorization": "Bearer ", "x-api-key": "k2"}, "k2"),
        ({"authorization": "Bearer    "}, None),
        ({"authorization": "Bearerk1"}, None),
        ({"authorization": ""}, None),
        ({"x-api-key": ""}, None),
        ({}, None),
    ],
)
def test_the_key_comes_from_a_bearer_token_or_x_api_key(headers: dict[str, str], key: str | None) -> None:
    assert key_from_headers(headers) == key


def test_scoped_keys_in_the_tokens_file_and_the_principal_they_give(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text("api_key: [plain, {key: scoped, models: [a, b]}]\nadmin_key: [{key: boss, models: [c]}]\n")
    ring = KeyRing.load(path)
    assert ring.principal("plain") == Principal(Role.USER)
    assert ring.principal("scoped") == Principal(Role.USER, frozenset({"a", "b"}))
    assert ring.principal("boss") == Principal(Role.ADMIN, frozenset({"c"}))
    assert ring.principal("scoped").allows(("b", "alias")) and not ring.principal("scoped").allows(("c",))
    assert Principal(Role.USER).allows(("anything",))
    path.write_text("api_key: [{key: k}]\n")  # a scoped entry needs its models
    with pytest.raises(ConfigError):
        KeyRing.load(path)


def test_a_jwt_secret_closes_the_ring_and_must_be_long_enough(tmp_path: Path) -> None:
    secret = "x" * 32
    ring = KeyRing.load(None, secret)
    assert not ring.open and ring.role_of(None) is Role.NONE
    assert ring.principal(mint_token(secret, "admin", 60, ["m"])) == Principal(Role.ADMIN, frozenset({"m"}))
    with pytest.raises(Unauthorized, match="expired"):
        ring.principal(mint_token(secret, "user", 60, now=time.time() - 3600))
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        KeyRing.load(None, "short")
