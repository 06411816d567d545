"""schemathesis against a live proxy with real workers: every operation of its own /openapi.json, with
bodies that follow the document (positive) and bodies that break it (negative), sent with the admin key.

Behind the model routes: SmolLM2 (llama.cpp), Piper, Whisper base and a tiny random-weight Stable Diffusion
pipeline. A generated case names one of them (or keeps its random name, a 404) and is capped where it
would only cost time (tokens, steps, image size, text length). Checks: no 5xx on any answer
(schemathesis' ``not_a_server_error``), and afterwards no worker crashed: every worker that was up is
still up or was unloaded, the proxy counts no ``crash`` unload and no model holds a crash reason.

Bounded: ``EXAMPLES`` cases per operation and mode, the same ones each run (derandomized), no shrinking.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from tests.harness import REPO, LiveProxy, running, smollm2_config, wait_until

pytestmark = pytest.mark.real

EXAMPLES = 4
TOKENS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}
ADMIN = {"Authorization": "Bearer admin-key"}
MODELS = ["smollm2:135m", "piper-joe", "whisper-base", "tiny-sd"]
# streams that never end by themselves: the status line is all a case can check there
ENDLESS = ("/status/events", "/logs/{model}")
# numbers that cost time and nothing else: capped (only when they are whole numbers, so bad types still go)
CAPS = {
    "max_tokens": 8,
    "max_completion_tokens": 8,
    "max_output_tokens": 8,
    "num_predict": 8,
    "n": 1,
    "num_images": 1,
    "batch_size": 1,
    "steps": 2,
    "num_inference_steps": 2,
    "width": 256,
    "height": 256,
    "num_ctx": 512,
}
TEXT_CAP = 200


def _cap(value: Any) -> Any:
    """The same body with time-costly numbers and texts capped, at any depth."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            cap = CAPS.get(key) if isinstance(key, str) else None
            if cap is not None and isinstance(item, int) and not isinstance(item, bool):
                item = max(min(item, cap), -cap)
            out[key] = _cap(item)
        if isinstance(out.get("input"), str) and len(out["input"]) > TEXT_CAP:
            out["input"] = out["input"][:TEXT_CAP]
        return out
    if isinstance(value, list):
        return [_cap(v) for v in value[:8]]
    return value


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pipeline: Path) -> Iterator[LiveProxy]:
    import yaml

    models = [smollm2_config(parallel=2)]
    for name in ("piper", "whisper"):
        models.append(yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text()))
    models.append(
        {
            "name": "tiny-sd",
            "backend": "diffusers",
            "load_timeout": "120s",
            "model": {"path": str(pipeline), "threads": 2, "width": 256, "height": 256, "steps": 2},
        }
    )
    with running(
        tmp_path_factory.mktemp("fuzz"),
        models,
        tokens=TOKENS,
        limits={"max_loaded_models": 4},
        defaults={"load_timeout": "120s"},
    ) as live:
        yield live


def _unloads(proxy: LiveProxy) -> dict[tuple[str, str], float]:
    """The proxy's unload counts by (model, reason), from /metrics."""
    text = httpx.get(proxy.url + "/metrics", headers=ADMIN, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "proxy_model_unloads_total":
                out[(sample.labels["model"], sample.labels["reason"])] = sample.value
    return out


def _warnings(proxy: LiveProxy) -> str:
    return "\n".join(line[:300] for line in proxy.log().splitlines() if " WARNING " in line or " ERROR " in line)


def _fuzz(proxy: LiveProxy, operation: Any, mode: GenerationMode) -> None:
    path = operation.path

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), model=st.sampled_from([*MODELS, None]))
    def run(case: Any, model: str | None) -> None:
        if model is not None:
            if isinstance(case.path_parameters, dict) and "model" in case.path_parameters:
                case.path_parameters["model"] = model
            if isinstance(case.body, dict):
                for key in ("model", "model_id"):
                    if key in case.body:
                        case.body[key] = model
        if isinstance(case.body, dict | list):
            case.body = _cap(case.body)
        if isinstance(case.query, dict) and "wait" in case.query:
            case.query["wait"] = 100
        if path in ENDLESS:  # the status line, then away (schemathesis would read the body to its end)
            kwargs = case.as_transport_kwargs(base_url=proxy.url, headers=ADMIN)
            with requests.request(**kwargs, stream=True, timeout=60) as streamed:
                assert streamed.status_code < 500, (streamed.status_code, case.as_curl_command(base_url=proxy.url))
            return
        response = case.call(base_url=proxy.url, headers=ADMIN, timeout=120)
        case.validate_response(response, checks=[not_a_server_error], headers=ADMIN)

    run()


def test_no_operation_answers_5xx_nor_crashes_a_worker(proxy: LiveProxy) -> None:
    schema = schemathesis.openapi.from_url(proxy.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if isinstance(r, Ok)]
    assert len(operations) > 40
    # load every model once, so its worker's pid is known before the fuzzing starts
    for name in MODELS:
        r = httpx.post(f"{proxy.url}/load/{name}", headers=ADMIN, timeout=180)
        assert r.status_code == 200, r.text
    before = {name: m["pid"] for name, m in proxy.status(ADMIN).items()}
    assert all(before.values()), before

    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(proxy, operation, mode)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to break: no parameters, no body, no key
            except (Exception, BaseExceptionGroup) as exc:  # collected: one report of every failing operation
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}"[:3000])
    assert not failures, "\n\n".join([*failures, _warnings(proxy)])

    # no worker crashed: each is the one that was up, or it stopped by an unload (not a crash) since
    wait_until(lambda: all(m["state"] in ("ready", "stopped") for m in proxy.status(ADMIN).values()), timeout=60)
    after = proxy.status(ADMIN)
    unloads = _unloads(proxy)
    assert [key for key, count in unloads.items() if key[1] == "crash" and count] == []
    for name, pid in before.items():
        model = after[name]
        assert model["last_error"] is None, (name, model["last_error"])
        if model["pid"] != pid:
            assert any(count for (m, _), count in unloads.items() if m == name), (name, pid, model)
    assert "exited with code" not in proxy.log(), _warnings(proxy)
