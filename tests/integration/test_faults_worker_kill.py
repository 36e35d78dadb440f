"""A worker SIGKILLed in the middle of a batch: nothing is lost, nothing gets two results.

The killed worker's messages (its running batch and its buffer) stay unacknowledged
in Redis. A live worker (here the replacement) puts them back in the queue once
they are older than the visibility timeout, and runs them.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from imagegenx.celery_client import SWEEP_LOCK_EXPIRE_S
from tests.integration.fault_stack import fault_service, wait_until

pytestmark = pytest.mark.integration

VISIBILITY_TIMEOUT_S = 4


def test_sigkill_mid_batch_every_request_completes_once(redis_base: str, tmp_path: Path) -> None:
    with fault_service(redis_base, tmp_path, IMAGEGENX_MAX_BATCH="4",
                       IMAGEGENX_MAX_WAIT_MS="100",
                       IMAGEGENX_EXPECTED_BATCH_S="1.2",
                       IMAGEGENX_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S)) as svc:
        first = svc.start_worker("victim")
        # 40 steps: about 1.1 s per batch of 4 (synthetic SD1.5-on-H200 cost).
        bodies = [{"prompt": f"a lighthouse {i}", "seed": 500 + i, "steps": 40} for i in range(12)]
        ids = [svc.submit(b) for b in bodies]

        def mid_batch() -> bool:
            states = svc.states(ids)
            return "PROGRESS" in states.values() and "RECEIVED" in states.values()

        wait_until(mid_batch, 20, "a running batch and a buffer")
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        # Killed inside its sweep for expired messages, a worker leaves the sweep's
        # lock in Redis with the expiry it set; no worker sweeps until it expires.
        with svc.celery.connection_for_write() as conn:  # the expiry kombu sets, as configured
            lock_s = conn.default_channel.unacked_mutex_expire
        assert lock_s == SWEEP_LOCK_EXPIRE_S
        svc.redis().set("unacked_mutex", "the-killed-worker", ex=lock_s)
        states = svc.states(ids)
        running = [t for t, s in states.items() if s in ("STARTED", "PROGRESS")]
        buffered = [t for t, s in states.items() if s == "RECEIVED"]
        assert running and buffered, states
        assert first.proc.returncode == -signal.SIGKILL

        svc.start_worker("replacement")
        # Watch every result from the moment it appears: it must never change.
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + 30
        while len(seen) < len(ids):
            assert time.monotonic() < deadline, f"unfinished: {set(ids) - set(seen)}"
            for t in ids:
                body = svc.status(t)
                if t in seen:
                    assert body["result"] == seen[t]["result"], f"{t} changed its result"
                elif body["state"] in ("SUCCESS", "FAILURE"):
                    seen[t] = body
            time.sleep(0.05)
        recovered_s = time.monotonic() - killed_at

        for body, t in zip(bodies, ids):
            assert seen[t]["state"] == "SUCCESS", seen[t]
            (image,) = seen[t]["result"]["images"]
            assert image["seed"] == body["seed"]  # the API fixed the seed: same image again
            assert (tmp_path / "images" / t / "0.png").is_file()
        time.sleep(0.5)
        for t in ids:  # nothing overwrote a stored result afterwards
            assert svc.status(t)["result"] == seen[t]["result"]
        # The killed batch ran once more, each request alone (it might have been
        # what killed the worker); nothing is left unacknowledged.
        for t in running:
            assert svc.deliveries(t) == {"received": 2, "started": 2}
        for t in buffered:
            assert svc.deliveries(t)["received"] == 2
        assert not set(ids) & svc.unacked_ids()
        replacement_log = svc.workers[-1].output()
        assert replacement_log.count("earlier deliveries whose worker was lost") == len(running)
        # Redelivery waits for the visibility timeout (and the dead worker's sweep
        # lock), then at most one sweep (1 s).
        assert recovered_s < VISIBILITY_TIMEOUT_S + SWEEP_LOCK_EXPIRE_S + 10
        print(f"\nkill -> all {len(ids)} done: {recovered_s:.1f} s "
              f"(visibility timeout {VISIBILITY_TIMEOUT_S} s; {len(running)} running, "
              f"{len(buffered)} buffered at the kill)")


def test_held_messages_outlive_the_visibility_timeout_without_redelivery(
        redis_base: str, tmp_path: Path) -> None:
    """A live worker refreshes the messages it holds: a batch (and the buffer behind
    it) that takes longer than the visibility timeout is not delivered twice."""
    with fault_service(redis_base, tmp_path, IMAGEGENX_MAX_BATCH="4", IMAGEGENX_MAX_STEPS="400",
                       IMAGEGENX_EXPECTED_BATCH_S="0.8", IMAGEGENX_VISIBILITY_TIMEOUT_S="3") as svc:
        worker = svc.start_worker("slow")
        # 250 steps alone: about 4 s, more than the 3 s visibility timeout.
        slow = svc.submit({"prompt": "a slow one", "seed": 1, "steps": 250})
        wait_until(lambda: svc.status(slow)["state"] == "PROGRESS", 15, "the slow batch")
        # These wait in the buffer behind it for as long.
        behind = [svc.submit({"prompt": f"behind {i}", "seed": 2 + i, "steps": 20})
                  for i in range(2)]
        done = svc.wait_states([slow] + behind, timeout=30)
        assert {b["state"] for b in done.values()} == {"SUCCESS"}
        for t in [slow] + behind:
            assert svc.deliveries(t) == {"received": 1, "started": 1}
        assert "already finished" not in worker.output()
