"""The pure eviction and backoff rules (proxy/policy.py) on worked examples; the same rules as
properties are in test_properties.py, and through the manager in test_manager.py."""

from __future__ import annotations

import math

from proxy.policy import Candidate, backoff, choose_victim


def test_backoff_doubles_from_one_second_up_to_a_minute() -> None:
    # a model whose start failed n times in a row is not started again for backoff(n) seconds
    assert [backoff(n) for n in range(10)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert backoff(-1) == 0.0
    assert backoff(1000) == 60.0  # no overflow for a model that keeps failing
    assert backoff(3, base=0.5, cap=1.5) == 1.5 and backoff(2, base=0.5, cap=10) == 1.0


def test_victim_is_the_shortest_keep_alive_then_the_least_recently_used_then_by_name() -> None:
    def c(name: str, keep_alive: float, last_used: float, busy: bool = False) -> Candidate:
        return Candidate(name, keep_alive, last_used, busy)

    assert choose_victim([]) is None
    assert choose_victim([c("a", 0, 1, busy=True)]) is None
    assert choose_victim([c("long", 600, 1), c("short", 60, 9)]) == "short"
    assert choose_victim([c("new", 60, 9), c("old", 60, 1)]) == "old"
    assert choose_victim([c("forever", math.inf, 0), c("five", 300, 5)]) == "five"
    assert choose_victim([c("b", 60, 1), c("a", 60, 1)]) == "a"  # a full tie: the same choice every time
    assert choose_victim([c("busy", 0, 0, busy=True), c("idle", 600, 9)]) == "idle"


def test_when_only_a_slot_is_missing_size_does_not_decide() -> None:
    # max_loaded_models full: the shortest keep_alive goes, even when it is the bigger model
    big_short = Candidate("big", keep_alive=60, last_used=0, busy=False, ram=2 << 30)
    small_long = Candidate("small", keep_alive=3600, last_used=0, busy=False, ram=1 << 20)
    assert choose_victim([small_long, big_short]) == "big"
