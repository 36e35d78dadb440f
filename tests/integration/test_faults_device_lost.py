"""A lost GPU (a sticky CUDA error, here the synthetic engine's ``device:``
fault) fails no request that merely shared its UNet call: the worker gives every
request it holds back to the queue at once and exits with status 70
(EX_SOFTWARE), as a supervisor expects of a process that must be replaced. The
request that loses the device every time ends FAILURE after ``max_deliveries``
runs; the others end SUCCESS, well before the visibility timeout would have
returned their messages.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.integration.fault_stack import fault_service
from tests.service import Worker

pytestmark = pytest.mark.integration

MAX_DELIVERIES = 2
VISIBILITY_TIMEOUT_S = 120


@pytest.mark.parametrize("scheduler", ["step", "request"])
def test_a_lost_device_gives_every_request_back_and_the_worker_exits(
        redis_base: str, tmp_path: Path, scheduler: str) -> None:
    with fault_service(redis_base, tmp_path, IMAGEGENX_SCHEDULER=scheduler,
                       IMAGEGENX_MAX_BATCH="8", IMAGEGENX_MAX_WAIT_MS="400",
                       IMAGEGENX_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
                       IMAGEGENX_MAX_DELIVERIES=str(MAX_DELIVERIES),
                       IMAGEGENX_SYNTHETIC_FAULTS="device:GONE") as svc:
        worker = svc.start_worker(f"{scheduler}0")
        innocent = [svc.submit({"prompt": f"a quiet harbour {i}", "seed": 50 + i, "steps": 30})
                    for i in range(3)]
        lost = svc.submit({"prompt": "a GONE lighthouse", "seed": 53, "steps": 30})
        ids = innocent + [lost]
        started = time.monotonic()

        def exited_for_the_supervisor(gone: Worker) -> None:
            log = gone.output()
            assert gone.proc.returncode == os.EX_SOFTWARE, log[-3000:]
            assert "the device failed (AcceleratorError: CUDA error: an illegal memory access" in log
            assert "Traceback" not in log
            assert "requeued" in log  # given back at once, not after the visibility timeout

        # Within half the visibility timeout: the messages came back through the requeue.
        worker, faults = svc.supervise(worker, ids, name=scheduler, max_exits=MAX_DELIVERIES,
                                       timeout=VISIBILITY_TIMEOUT_S / 2, on_exit=exited_for_the_supervisor)

        final = {t: svc.status(t) for t in ids}
        assert final[lost]["state"] == "FAILURE"
        assert final[lost]["error"]["message"] == (
            f"gave up after {MAX_DELIVERIES} deliveries: the worker was lost each time this "
            "request ran")
        for t in innocent:
            assert final[t]["state"] == "SUCCESS", final[t]
            assert final[t]["result"]["images"], final[t]
        # Those that shared the lost call ran again elsewhere, from the start.
        assert any(svc.deliveries(t)["started"] >= 2 for t in innocent), [svc.deliveries(t) for t in innocent]
        assert len(faults) == MAX_DELIVERIES
        assert svc.deliveries(lost)["started"] == MAX_DELIVERIES
        assert not set(ids) & svc.unacked_ids()
        time.sleep(1.0)
        assert worker.proc.poll() is None  # the last worker lives on
        print(f"\n{scheduler}: the device was lost at {', '.join(f'{f:.1f}' for f in faults)} s; "
              f"all requests ended at {time.monotonic() - started:.1f} s")
