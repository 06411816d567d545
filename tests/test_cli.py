"""The ``proxy`` command line as a subprocess: ``serve`` (and no subcommand) serves, ``token`` mints a JWT
that a live proxy accepts, scoped when asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
import yaml

from proxy.cli import parse_ttl
from tests.harness import REPO, LiveProxy, answers, fake_config, running, wait_until

SECRET = "a-secret-of-at-least-thirty-two-bytes"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )


def test_token_mints_a_jwt_a_live_proxy_accepts_and_a_scoped_one_sees_only_its_models(tmp_path: Path) -> None:
    with running(tmp_path, [fake_config("one"), fake_config("two")], auth={"jwt_secret": SECRET}) as proxy:
        config = str(proxy.root / "config.yml")
        assert httpx.get(proxy.url + "/v1/models").status_code == 401  # a secret alone closes the proxy
        full = cli("token", "--role", "admin", "--ttl", "1h", "--config", config)
        assert full.returncode == 0, full.stderr
        claims = jwt.decode(full.stdout.strip(), SECRET, algorithms=["HS256"])
        assert claims["role"] == "admin" and claims["exp"] - claims["iat"] == 3600 and "models" not in claims
        headers = {"Authorization": f"Bearer {full.stdout.strip()}"}
        names = {m["id"] for m in httpx.get(proxy.url + "/v1/models", headers=headers).json()["data"]}
        assert names == {"one", "two"}
        scoped = cli("token", "--role", "user", "--ttl", "1d", "--models", "two", "--config", config)
        assert scoped.returncode == 0, scoped.stderr
        headers = {"Authorization": f"Bearer {scoped.stdout.strip()}"}
        names = {m["id"] for m in httpx.get(proxy.url + "/v1/models", headers=headers).json()["data"]}
        assert names == {"two"}
        body = {"model": "one", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers).status_code == 404
        assert httpx.post(proxy.url + "/unload", headers=headers).status_code == 403  # a user token


def test_token_refuses_without_a_secret_or_with_an_unknown_model(tmp_path: Path) -> None:
    proxy = LiveProxy(tmp_path, [fake_config("one")])  # writes the config; never started
    config = str(proxy.root / "config.yml")
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    r = cli("token", "--config", config, env=env)
    assert r.returncode != 0 and "no JWT secret" in r.stderr
    r = cli("token", "--config", config, "--models", "one,nope", env={**env, "SECRET_KEY": SECRET})
    assert r.returncode != 0 and "no such model" in r.stderr and "nope" in r.stderr
    r = cli("token", "--config", config, env={**env, "SECRET_KEY": SECRET})  # the variable stands in
    assert r.returncode == 0 and jwt.decode(r.stdout.strip(), SECRET, algorithms=["HS256"])["role"] == "user"
    r = cli("token", "--config", config, "--ttl", "soon", env={**env, "SECRET_KEY": SECRET})
    assert r.returncode != 0 and "not a duration" in r.stderr


@pytest.mark.parametrize("subcommand", [[], ["serve"]])
def test_serve_and_no_subcommand_both_serve_with_the_same_options(tmp_path: Path, subcommand: list[str]) -> None:
    proxy = LiveProxy(tmp_path, [fake_config("one")])
    config = yaml.safe_load((proxy.root / "config.yml").read_text())
    assert config["server"]["port"] == 0  # so the served port is the one given on the command line
    cmd = [sys.executable, "-m", "proxy", *subcommand, "--config", str(proxy.root / "config.yml")]
    cmd += ["--port", str(proxy.port), "--log-level", "debug"]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            wait_until(lambda: proc.poll() is not None or answers(proxy.url + "/health"), timeout=30)
            assert proc.poll() is None
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
    assert " DEBUG " in out  # --log-level reached the server


def test_ttl_forms() -> None:
    assert parse_ttl("3600") == 3600 and parse_ttl("90m") == 5400 and parse_ttl("1d") == 86400
    assert parse_ttl("1w2d") == 9 * 86400 and parse_ttl("1h30m") == 5400
    for bad in ("0", "-5", "1x", "1d junk", ""):
        with pytest.raises(Exception, match="duration|longer than 0"):
            parse_ttl(bad)
