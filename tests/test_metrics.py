"""The request counters of /metrics, fed by the request events (the live proxy's /metrics: tests/test_ops.py)."""

from __future__ import annotations

from proxy.events import EventBus, RequestEnded
from proxy.metrics import Metrics

CHAT = "/v1/chat/completions"


def ended(
    n: int, model: str, status: int, *, route: str = CHAT, tokens: int | None = None, ttft: float | None = None
) -> RequestEnded:
    return RequestEnded(
        id=n, model=model, route=route, method="POST", status=status, seconds=0.01 * n, tokens=tokens, ttft=ttft
    )


def test_each_request_counts_under_its_own_model_route_and_status() -> None:
    # the counters' labelled children are found once and kept (Metrics._child): each combination keeps its own
    bus = EventBus()
    metrics = Metrics(bus)
    for n, (model, status, route) in enumerate(
        [("a", 200, CHAT), ("a", 200, CHAT), ("a", 400, CHAT), ("b", 200, CHAT), ("a", 200, "/api/chat")]
    ):
        bus.publish(ended(n, model, status, route=route, tokens=3))
    bus.publish(ended(9, "a", 200, ttft=0.2))  # a streamed one: its time to first token too

    def requests(model: str, status: str, route: str = CHAT) -> float | None:
        labels = {"model": model, "route": route, "status": status}
        return metrics.registry.get_sample_value("proxy_requests_total", labels)

    assert (requests("a", "200"), requests("a", "400"), requests("b", "200")) == (3.0, 1.0, 1.0)
    assert requests("a", "200", "/api/chat") == 1.0
    assert requests("b", "400") is None
    seconds = metrics.registry.get_sample_value("proxy_request_seconds_count", {"model": "a", "route": CHAT})
    assert seconds == 4.0
    ttft = metrics.registry.get_sample_value("proxy_time_to_first_token_seconds_count", {"model": "a", "route": CHAT})
    assert ttft == 1.0
    assert metrics.registry.get_sample_value("proxy_generated_tokens_total", {"model": "a"}) == 12.0
    assert metrics.registry.get_sample_value("proxy_generated_tokens_total", {"model": "b"}) == 3.0
