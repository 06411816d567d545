"""API keys from api_tokens.yml (TabbyAPI's shape): user keys and admin keys.

``api_key`` may call model endpoints; ``admin_key`` may also load and unload, and is valid
wherever ``api_key`` is. Keys are compared in constant time and never logged. With no keys at
all the proxy runs open.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import yaml

from proxy.errors import ConfigError, Forbidden, Unauthorized


class Role(enum.IntEnum):
    NONE = 0
    USER = 1
    ADMIN = 2


class _TokensFile(msgspec.Struct, forbid_unknown_fields=True):
    api_key: list[str] | str | None = None
    admin_key: list[str] | str | None = None


def _as_list(value: list[str] | str | None) -> tuple[bytes, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    return tuple(k.encode() for k in items if k)


@dataclass(frozen=True)
class KeyRing:
    user_keys: tuple[bytes, ...] = ()
    admin_keys: tuple[bytes, ...] = ()

    @property
    def open(self) -> bool:
        return not self.user_keys and not self.admin_keys

    @classmethod
    def load(cls, path: Path | None) -> KeyRing:
        """The keys in ``path``. ``None`` (``api_tokens: null``) is open on purpose; a file that does not
        exist is a ConfigError (a typo must not run the proxy open), one with empty lists is open."""
        if path is None:
            return cls()
        if not path.is_file():
            raise ConfigError(str(path), "", "the API tokens file does not exist (api_tokens: null runs open)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            raw = msgspec.convert(data, _TokensFile, strict=True)
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), "", f"not valid YAML: {exc}") from exc
        except msgspec.ValidationError as exc:
            raise ConfigError(str(path), "", str(exc)) from exc
        return cls(_as_list(raw.api_key), _as_list(raw.admin_key))

    @staticmethod
    def _matches(candidate: bytes, keys: Iterable[bytes]) -> bool:
        found = False
        for key in keys:  # no early exit: every key is compared
            found |= hmac.compare_digest(candidate, key)
        return found

    def role_of(self, key: str | None) -> Role:
        if self.open:
            return Role.ADMIN
        if not key:
            return Role.NONE
        candidate = key.encode()
        if self._matches(candidate, self.admin_keys):
            return Role.ADMIN
        if self._matches(candidate, self.user_keys):
            return Role.USER
        return Role.NONE

    def require(self, key: str | None, needed: Role) -> Role:
        """The caller's role; Unauthorized (401) without a valid key, Forbidden (403) below ``needed``."""
        role = self.role_of(key)
        if role is Role.NONE:
            raise Unauthorized(
                "missing API key" if not key else "invalid API key",
            )
        if role < needed:
            raise Forbidden("this endpoint needs an admin key")
        return role


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer KEY``, ``Authorization: Basic base64(KEY | user:KEY | :KEY)``
    (AUTOMATIC1111 clients such as Open WebUI's send their "API Auth" field that way) or ``x-api-key``.
    An Authorization header with another scheme is a 401 that names it."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return value
        if scheme.lower() == "basic" and value:
            return basic_key(value)
        if scheme.lower() not in ("bearer", "basic"):
            raise Unauthorized(f"unsupported authorization scheme {scheme[:32]}: send Bearer KEY, Basic or x-api-key")
    return headers.get("x-api-key") or None


def basic_key(value: str) -> str:
    """The key in Basic credentials: the password when there is one (``user:KEY``, ``:KEY``), else the
    whole credential (``KEY``). Keys containing ':' are sent as ``:KEY``."""
    try:
        credential = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials: expected base64 of KEY, user:KEY or :KEY") from None
    _, colon, password = credential.partition(":")
    return password if colon else credential
