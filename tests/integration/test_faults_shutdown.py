"""Warm shutdown (SIGTERM): the running batch finishes and is stored, the buffered
requests go back to the queue at once and another worker runs them within seconds."""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.fault_stack import fault_service, wait_until

pytestmark = pytest.mark.integration


def test_sigterm_finishes_the_batch_and_hands_the_buffer_over(redis_base: str,
                                                              tmp_path: Path) -> None:
    # The visibility timeout (600 s) is far away: anything that comes back
    # within seconds was given back by the stopping worker.
    with fault_service(redis_base, tmp_path, IMAGEGENX_MAX_BATCH="4", IMAGEGENX_MAX_STEPS="400",
                       IMAGEGENX_MAX_WAIT_MS="50") as svc:
        stopping = svc.start_worker("stopping")
        # 300 steps of 4 images: about 8 s (synthetic SD1.5-on-H200 cost). It fills every
        # row, so the short requests wait in the buffer under either scheduler.
        long_id = svc.submit({"prompt": "a long one", "seed": 1, "steps": 300, "num_images": 4})
        wait_until(lambda: svc.status(long_id)["state"] == "PROGRESS", 15, "the long batch")
        short = [svc.submit({"prompt": f"short {i}", "seed": 10 + i, "steps": 20})
                 for i in range(6)]
        wait_until(lambda: set(svc.states(short).values()) == {"RECEIVED"}, 15,
                   "the short requests in the buffer")
        successor = svc.start_worker("successor")
        assert svc.status(long_id)["state"] == "PROGRESS"

        stopping.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        short_done = svc.wait_states(short, timeout=20)
        handed_over_s = time.monotonic() - sigterm_at
        long_done = svc.wait_states([long_id], timeout=20)[long_id]
        long_s = time.monotonic() - sigterm_at
        assert stopping.proc.wait(20) == 0
        exited_s = time.monotonic() - sigterm_at

        assert {b["state"] for b in short_done.values()} == {"SUCCESS"}
        assert long_done["state"] == "SUCCESS"
        # The buffer came back at once: done long before the running batch ended.
        assert handed_over_s < 5.0
        assert handed_over_s < long_s - 1.0
        log = stopping.output()
        assert re.search(r"requeued 6 buffered requests", log), log[-3000:]
        # The long request ran once, on the stopping worker; the short ones were
        # delivered twice and ran once, on the successor.
        assert svc.deliveries(long_id) == {"received": 1, "started": 1}
        for t in short:
            assert svc.deliveries(t) == {"received": 2, "started": 1}
        assert successor.proc.poll() is None
        assert not set(short + [long_id]) & svc.unacked_ids()
        print(f"\nSIGTERM -> 6 buffered requests done by the successor: {handed_over_s:.2f} s; "
              f"running batch stored: {long_s:.2f} s; worker exited: {exited_s:.2f} s")
