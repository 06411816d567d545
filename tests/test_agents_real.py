"""The coding agents the README promises, run for real against a live proxy: Claude Code (Anthropic's
Messages API) and the Codex CLI (the Responses API), at the versions pinned in tests/agents/package.json
(installed by ``scripts/setup.sh --test``).

- One turn each on SmolLM2 with a context that holds their prompts (Claude Code's is about 12k tokens), with
  a key: the agent exits 0 with an answer.
- A full tool round trip each, driven by a scripted model (``tests/fake_worker.py --script``): the first
  request is answered with a tool call (Claude Code's ``Read`` of a file in its working folder, Codex's shell
  running ``cat`` of one), the agent runs it and sends the file's secret text back in its next request, and
  the model answers with a text holding it, which the agent must finish with.

Both agents stream every request (neither has a switch for answers that are not streamed); the proxy's
streamed and whole answers are covered by the dialects' own tests. Each agent runs with its HOME and config
folder in a temporary directory, its telemetry and updates off.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, LiveProxy, fake_config, smollm2_config

BIN = REPO / "tests" / "agents" / "node_modules" / ".bin"
KEY = "agent-key"
SECRET = "violet-kumquat-4711"
ANSWER = f"The file says {SECRET}."
MakeProxy = Callable[..., LiveProxy]
SLOW = {"worker_idle_timeout": "20m"}  # a 12k-token prefill on a busy shared CPU sends nothing for minutes
TIMEOUT = 1800  # Claude Code's 12k-token prompt on SmolLM2 takes ~30 s on 2 free cores, minutes on a busy one


def _agent(name: str) -> Path:
    path = BIN / name
    assert path.exists(), f"{path} is missing: run scripts/setup.sh --test (npm ci in tests/agents)"
    return path


def _run(proxy: LiveProxy, cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: os.environ[k] for k in ("PATH", "LANG", "TMPDIR") if k in os.environ}
    try:
        return subprocess.run(
            cmd,
            env={**base, **env},
            cwd=cwd,
            stdin=subprocess.DEVNULL,  # codex exec reads a prompt from stdin otherwise
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{cmd[0]} did not finish in {TIMEOUT}s; the proxy's log:\n{proxy.log()[-4000:]}") from exc


def claude(proxy: LiveProxy, model: str, prompt: str, home: Path, cwd: Path, *extra: str) -> dict[str, Any]:
    """``claude -p PROMPT --output-format json`` against the proxy; its JSON result."""
    env = {
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": proxy.url,
        "ANTHROPIC_AUTH_TOKEN": KEY,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "API_TIMEOUT_MS": str(TIMEOUT * 1000),
    }
    done = _run(proxy, [str(_agent("claude")), "-p", prompt, "--output-format", "json", *extra], env, cwd)
    assert done.returncode == 0, (
        f"claude exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{proxy.log()[-4000:]}"
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def codex(proxy: LiveProxy, model: str, prompt: str, home: Path, cwd: Path) -> str:
    """``codex exec PROMPT`` against the proxy, with the README's config.toml; its last message."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "local-proxy"\n\n'
        "[model_providers.local-proxy]\n"
        'name = "llm-lifecycle-proxy"\n'
        f'base_url = "{proxy.url}/v1"\n'
        'wire_api = "responses"\n'
        'env_key = "PROXY_API_KEY"\n'
        f"stream_idle_timeout_ms = {TIMEOUT * 1000}\n"
        "request_max_retries = 0\n"
        "stream_max_retries = 0\n"
    )
    last = home / "last-message.txt"
    env = {"HOME": str(home), "CODEX_HOME": str(codex_home), "PROXY_API_KEY": KEY}
    cmd = [
        str(_agent("codex")),
        "exec",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",  # its shell runs `cat` in a temporary folder
        "--output-last-message",
        str(last),
        prompt,
    ]
    done = _run(proxy, cmd, env, cwd)
    assert done.returncode == 0, f"codex exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{proxy.log()[-4000:]}"
    return last.read_text()


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return home, work


def _smollm2_for_agents() -> dict[str, Any]:
    """SmolLM2 with a context that holds an agent's prompt and a cap on its answers (the README's YAML); it
    stops at its first sentence's end: SmolLM2 rambles past any cap on an agent's prompt, and an answer cut by
    the cap is a Responses ``incomplete``, which Codex reports as an error."""
    cfg = smollm2_config(sampling={"temperature": 0, "max_tokens": 64, "stop": [".", "\n"]})
    cfg["model"]["n_ctx"] = 20480
    return cfg


# -- one turn on the real model ---------------------------------------------------------------------


@pytest.mark.real
def test_claude_code_finishes_a_turn_on_smollm2(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = make_proxy([_smollm2_for_agents()], tokens={"api_key": [KEY]}, limits=SLOW)
    home, work = _folders(tmp_path)
    result = claude(proxy, "smollm2", "Reply with the single word: hello", home, work)
    assert result["type"] == "result" and result["is_error"] is False, result
    assert isinstance(result["result"], str) and result["result"].strip(), result


@pytest.mark.real
def test_codex_finishes_a_turn_on_smollm2(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = make_proxy([_smollm2_for_agents()], tokens={"api_key": [KEY]}, limits=SLOW)
    home, work = _folders(tmp_path)
    answer = codex(proxy, "smollm2", "Reply with the single word: hello", home, work)
    assert answer.strip()


# -- a tool round trip with a scripted model --------------------------------------------------------


def _scripted(tmp_path: Path, calls: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"calls": calls, "secret": SECRET, "answer": ANSWER}))
    record = tmp_path / "requests.jsonl"
    return fake_config("scripted", "--script", str(script), "--record", str(record)), record


def _requests(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line)["body"] for line in record.read_text().splitlines()]


def _tool_results(body: dict[str, Any]) -> list[str]:
    return [json.dumps(m.get("content")) for m in body["messages"] if m.get("role") == "tool"]


def test_claude_code_reads_a_file_and_answers_with_it(make_proxy: MakeProxy, tmp_path: Path) -> None:
    home, work = _folders(tmp_path)
    secret = work / "secret.txt"
    secret.write_text(SECRET + "\n")
    model, record = _scripted(tmp_path, {"Read": {"file_path": str(secret)}})
    proxy = make_proxy([model], tokens={"api_key": [KEY]})
    result = claude(proxy, "scripted", "What does secret.txt say?", home, work, "--allowedTools", "Read")
    assert result["is_error"] is False and result["result"] == ANSWER, result
    sent = _requests(record)
    assert any(SECRET in r for body in sent for r in _tool_results(body)), "the Read result never came back"
    assert all(body["stream"] for body in sent)


def test_codex_runs_cat_and_answers_with_it(make_proxy: MakeProxy, tmp_path: Path) -> None:
    home, work = _folders(tmp_path)
    (work / "secret.txt").write_text(SECRET + "\n")
    # whichever shell tool this version offers the model: `shell` (argv) or `exec_command` (a command line)
    calls = {"shell": {"command": ["cat", "secret.txt"]}, "exec_command": {"cmd": "cat secret.txt"}}
    model, record = _scripted(tmp_path, calls)
    proxy = make_proxy([model], tokens={"api_key": [KEY]})
    answer = codex(proxy, "scripted", "What does secret.txt say?", home, work)
    assert answer.strip() == ANSWER
    sent = _requests(record)
    assert any(SECRET in r for body in sent for r in _tool_results(body)), "the shell's output never came back"
