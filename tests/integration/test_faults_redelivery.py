"""Redelivery cap: a request whose processing kills the worker process ends FAILURE
after ``max_deliveries`` deliveries instead of killing workers forever, while the
requests that shared its batch complete.

The worker is replaced each time it dies, as a process supervisor would; the
dead worker's messages come back after the visibility timeout.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.integration.fault_stack import fault_service
from tests.service import Worker

pytestmark = pytest.mark.integration

MAX_DELIVERIES = 3


def test_request_that_kills_its_worker_gives_up_after_max_deliveries(redis_base: str,
                                                                     tmp_path: Path) -> None:
    with fault_service(redis_base, tmp_path, IMAGEGENX_MAX_BATCH="4",
                       IMAGEGENX_MAX_WAIT_MS="500",
                       IMAGEGENX_EXPECTED_BATCH_S="0.8",
                       IMAGEGENX_VISIBILITY_TIMEOUT_S="3",
                       IMAGEGENX_MAX_DELIVERIES=str(MAX_DELIVERIES),
                       IMAGEGENX_SYNTHETIC_FAULTS="exit:KILLER") as svc:
        worker = svc.start_worker("gen0")
        innocent = [svc.submit({"prompt": f"a calm lake {i}", "seed": 20 + i, "steps": 10})
                    for i in range(3)]
        killer = svc.submit({"prompt": "a KILLER whale", "seed": 23, "steps": 10})
        ids = innocent + [killer]
        started = time.monotonic()

        def killed(dead: Worker) -> None:
            assert dead.proc.returncode == -signal.SIGKILL

        worker, crashes = svc.supervise(worker, ids, name="gen", max_exits=MAX_DELIVERIES,
                                        timeout=60, on_exit=killed)
        given_up_s = time.monotonic() - started

        final = {t: svc.status(t) for t in ids}
        assert final[killer]["state"] == "FAILURE"
        assert final[killer]["error"]["message"] == (
            f"gave up after {MAX_DELIVERIES} deliveries: the worker was lost each time this "
            "request ran")
        for t in innocent:
            assert final[t]["state"] == "SUCCESS", final[t]
            # After the first crash each ran alone, once.
            assert final[t]["result"]["batch"]["requests"] == 1
            assert svc.deliveries(t)["started"] == 2
        assert len(crashes) == MAX_DELIVERIES
        assert svc.deliveries(killer) == {"received": MAX_DELIVERIES + 1,
                                          "started": MAX_DELIVERIES}
        assert not set(ids) & svc.unacked_ids()
        time.sleep(1.0)
        assert worker.proc.poll() is None  # the last worker lives on
        print(f"\n{MAX_DELIVERIES} worker crashes at {', '.join(f'{c:.1f}' for c in crashes)} s; "
              f"killer FAILURE and all others SUCCESS at {given_up_s:.1f} s")
