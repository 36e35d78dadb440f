"""WorkerPresence: one ping in flight, its answer reused, the last answer kept while refreshing."""
from __future__ import annotations

import threading
import time

from imagegenx.api.worker_presence import WorkerPresence


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_call_pings_and_later_ones_reuse_the_answer_until_it_is_old() -> None:
    clock, calls = Clock(), []
    presence = WorkerPresence(lambda: calls.append(1) or ["w2", "w1"], max_age_s=2.0, clock=clock)
    assert presence.workers() == ["w1", "w2"]
    clock.now += 1.9
    assert presence.workers() == ["w1", "w2"] and len(calls) == 1


def test_a_stale_answer_is_given_while_one_background_ping_refreshes_it() -> None:
    clock = Clock()
    answers = iter([["w1"], ["w1", "w2"]])
    release = threading.Event()
    pings: list[float] = []

    def ping() -> list[str]:
        pings.append(clock.now)
        if len(pings) == 2:
            release.wait(5)
        return next(answers)

    presence = WorkerPresence(ping, max_age_s=2.0, clock=clock)
    assert presence.workers() == ["w1"]
    clock.now += 3
    # Stale: every caller gets the last answer at once; only one ping starts.
    assert [presence.workers() for _ in range(20)] == [["w1"]] * 20
    assert len(pings) == 2
    release.set()
    deadline = time.monotonic() + 5
    while presence.workers() != ["w1", "w2"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(pings) == 2


def test_concurrent_first_calls_share_one_ping() -> None:
    calls = []

    def ping() -> list[str]:
        calls.append(1)
        time.sleep(0.2)
        return ["w1"]

    presence = WorkerPresence(ping, max_age_s=2.0)
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(presence.workers())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == [["w1"]] * 16 and len(calls) == 1


def test_a_failing_ping_means_no_worker() -> None:
    def ping() -> list[str]:
        raise OSError("broker gone")

    assert WorkerPresence(ping, max_age_s=2.0).workers() == []
