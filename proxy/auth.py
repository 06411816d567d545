"""Who is calling: API keys from api_tokens.yml (TabbyAPI's shape) and JWT bearer tokens.

``api_key`` may call model endpoints; ``admin_key`` may also load and unload, and is valid
wherever ``api_key`` is. A key is a string, or ``{key: ..., models: [...]}``: scoped to those models
(names or aliases). With ``auth.jwt_secret`` (or ``SECRET_KEY``), ``Authorization: Bearer <JWT>`` is
accepted too: HS256, ``exp`` required, ``role: user|admin``, optional ``models: [...]``. Keys are compared
in constant time and never logged. With no keys and no secret the proxy runs open.

``KeyRing.principal`` answers with a ``Principal``: the caller's role and what it may see
(``allows``). Routes never check scopes themselves: they ask ``proxy.api.common.caller(request)``, the
caller's view of the models.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
import msgspec
import yaml

from proxy.errors import ConfigError, Forbidden, Unauthorized


class Role(enum.IntEnum):
    NONE = 0
    USER = 1
    ADMIN = 2


ROLES = {"user": Role.USER, "admin": Role.ADMIN}
JWT_ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key is at least as long as the hash


@dataclass(frozen=True)
class Principal:
    """The caller: its role, and the models it may see (``None``: every model)."""

    role: Role
    models: frozenset[str] | None = None

    def allows(self, names: Iterable[str]) -> bool:
        """May it see the model known by these names (its name and aliases)? One listed name is enough."""
        return self.models is None or any(name in self.models for name in names)


class _ScopedKey(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    models: list[str]


_Entries = list[str | _ScopedKey] | str | None


class _TokensFile(msgspec.Struct, forbid_unknown_fields=True):
    api_key: _Entries = None
    admin_key: _Entries = None


def _as_list(value: _Entries) -> tuple[tuple[bytes, ...], tuple[tuple[bytes, frozenset[str]], ...]]:
    """The keys, and the scoped ones among them with their models."""
    if value is None:
        return (), ()
    items = [value] if isinstance(value, str) else value
    keys: list[bytes] = []
    scopes: list[tuple[bytes, frozenset[str]]] = []
    for item in items:
        if isinstance(item, str):
            if item:
                keys.append(item.encode())
        elif item.key:
            keys.append(item.key.encode())
            scopes.append((item.key.encode(), frozenset(item.models)))
    return tuple(keys), tuple(scopes)


@dataclass(frozen=True)
class KeyRing:
    user_keys: tuple[bytes, ...] = ()
    admin_keys: tuple[bytes, ...] = ()
    scopes: tuple[tuple[bytes, frozenset[str]], ...] = ()  # the keys given with ``models:``
    jwt_secret: str | None = None

    @property
    def open(self) -> bool:
        return not self.user_keys and not self.admin_keys and not self.jwt_secret

    @classmethod
    def load(cls, path: Path | None, jwt_secret: str | None = None) -> KeyRing:
        """The keys in ``path``. ``None`` (``api_tokens: null``) is open on purpose; a file that does not
        exist is a ConfigError (a typo must not run the proxy open), one with empty lists is open."""
        if jwt_secret is not None and len(jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError("auth.jwt_secret", "", f"must be at least {MIN_SECRET_BYTES} bytes (HS256)")
        if path is None:
            return cls(jwt_secret=jwt_secret)
        if not path.is_file():
            raise ConfigError(str(path), "", "the API tokens file does not exist (api_tokens: null runs open)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            raw = msgspec.convert(data, _TokensFile, strict=True)
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), "", f"not valid YAML: {exc}") from exc
        except msgspec.ValidationError as exc:
            raise ConfigError(str(path), "", str(exc)) from exc
        users, user_scopes = _as_list(raw.api_key)
        admins, admin_scopes = _as_list(raw.admin_key)
        return cls(users, admins, user_scopes + admin_scopes, jwt_secret)

    @staticmethod
    def _matches(candidate: bytes, keys: Iterable[bytes]) -> bool:
        found = False
        for key in keys:  # no early exit: every key is compared
            found |= hmac.compare_digest(candidate, key)
        return found

    def _scope(self, candidate: bytes) -> frozenset[str] | None:
        found: frozenset[str] | None = None
        for key, models in self.scopes:  # no early exit here either
            if hmac.compare_digest(candidate, key):
                found = models
        return found

    def principal(self, key: str | None) -> Principal:
        """Who ``key`` is: a static key (with its scope), else a JWT when a secret is set. Unauthorized (401)
        for a JWT that does not hold (its reason inside); Role.NONE for no key or an unknown one."""
        if self.open:
            return Principal(Role.ADMIN)
        if not key:
            return Principal(Role.NONE)
        candidate = key.encode()
        role = Role.NONE
        if self._matches(candidate, self.admin_keys):
            role = Role.ADMIN
        elif self._matches(candidate, self.user_keys):
            role = Role.USER
        if role is not Role.NONE:
            return Principal(role, self._scope(candidate))
        if self.jwt_secret and key.count(".") == 2:
            return decode_token(key, self.jwt_secret)
        return Principal(Role.NONE)

    def role_of(self, key: str | None) -> Role:
        try:
            return self.principal(key).role
        except Unauthorized:
            return Role.NONE

    def authenticate(self, key: str | None, needed: Role) -> Principal:
        """The caller; Unauthorized (401) without a valid key or token, Forbidden (403) below ``needed``."""
        principal = self.principal(key)
        if principal.role is Role.NONE:
            raise Unauthorized("missing API key" if not key else "invalid API key", token_given=bool(key))
        if principal.role < needed:
            raise Forbidden("this endpoint needs an admin key")
        return principal

    def require(self, key: str | None, needed: Role) -> Role:
        """The caller's role (``authenticate``'s checks)."""
        return self.authenticate(key, needed).role


class _Claims(msgspec.Struct):
    exp: float
    role: str
    models: list[str] | None = None


def decode_token(token: str, secret: str) -> Principal:
    """A JWT's caller: HS256 with ``secret``, ``exp`` required, ``role`` user or admin, optional ``models``.
    Unauthorized (401) naming what is wrong otherwise."""
    try:
        claims = jwt.decode(token, secret, algorithms=[JWT_ALGORITHM], options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired", token_given=True) from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"the token has no '{exc.claim}' claim (an expiry is required)", token_given=True) from None
    except jwt.InvalidSignatureError:
        raise Unauthorized("the token's signature does not match", token_given=True) from None
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"invalid token: {exc}", token_given=True) from None
    try:
        parsed = msgspec.convert(claims, _Claims)
    except msgspec.ValidationError as exc:
        raise Unauthorized(f"invalid token claims: {exc}", token_given=True) from None
    role = ROLES.get(parsed.role)
    if role is None:
        raise Unauthorized("the token's role must be 'user' or 'admin'", token_given=True)
    return Principal(role, frozenset(parsed.models) if parsed.models is not None else None)


def mint_token(
    secret: str, role: str, ttl: float, models: Sequence[str] | None = None, now: float | None = None
) -> str:
    """A JWT for ``role`` that expires ``ttl`` seconds from ``now``, scoped to ``models`` when given."""
    if role not in ROLES:
        raise ValueError("role must be 'user' or 'admin'")
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"role": role, "iat": issued, "exp": issued + int(ttl)}
    if models is not None:
        claims["models"] = list(models)
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


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
