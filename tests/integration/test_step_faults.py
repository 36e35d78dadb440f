"""Step scheduler, through the real queue path and a real worker process: a request
that breaks the UNet call fails alone while the others go on; an out-of-memory
call lowers the row limit and the rows that did not fit wait and then finish;
short requests leave early while long ones go on; each request reports its own
progress. Faults come from the synthetic engine (IMAGEGENX_SYNTHETIC_FAULTS).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.integration.fault_stack import fault_service

pytestmark = pytest.mark.integration


def test_a_request_that_breaks_the_unet_call_fails_alone(redis_base: str, tmp_path: Path) -> None:
    with fault_service(redis_base, tmp_path, IMAGEGENX_SCHEDULER="step", IMAGEGENX_MAX_BATCH="8",
                       IMAGEGENX_SYNTHETIC_FAULTS="raise:POISON") as svc:
        worker = svc.start_worker("step-poison")
        good = [svc.submit({"prompt": f"a quiet harbour {i}", "seed": 40 + i, "steps": 20})
                for i in range(7)]
        bad = svc.submit({"prompt": "a POISON apple", "seed": 47, "steps": 20})
        done = svc.wait_states(good + [bad], timeout=30)

        assert done[bad]["state"] == "FAILURE"
        assert done[bad]["error"]["type"] == "GenerationError"
        assert "injected fault: a prompt contains 'POISON'" in done[bad]["error"]["message"]
        for t in good:
            assert done[t]["state"] == "SUCCESS", done[t]
        # The others shared UNet calls with each other, before and after the failure.
        assert max(done[t]["result"]["batch"]["requests"] for t in good) >= 2
        log = worker.output()
        assert "running each request alone" in log
        assert not (tmp_path / "images" / bad).exists()
        assert svc.deliveries(bad) == {"received": 1, "started": 1}
        assert bad not in svc.unacked_ids()


def test_out_of_memory_lowers_the_row_limit_and_nothing_is_lost(redis_base: str,
                                                                 tmp_path: Path) -> None:
    # The engine runs out of memory above 3 image rows per UNet call.
    with fault_service(redis_base, tmp_path, IMAGEGENX_SCHEDULER="step", IMAGEGENX_MAX_BATCH="8",
                       IMAGEGENX_SYNTHETIC_FAULTS="oom:3") as svc:
        worker = svc.start_worker("step-oom")
        first = [svc.submit({"prompt": f"a field {i}", "seed": 60 + i, "steps": 20, "num_images": 2})
                 for i in range(4)]
        done = svc.wait_states(first, timeout=30)
        assert {b["state"] for b in done.values()} == {"SUCCESS"}
        log = worker.output()
        cuts = re.findall(r"out of memory with (\d+) images \((\d+) UNet rows\): calls are cut to at most "
                          r"(\d+) UNet rows", log)
        # Each cut is below the rows that ran out; the last one fits the memory (two rows per
        # guided image: at most 3 images, 6 rows).
        assert cuts and all(int(images) > 3 and int(limit) < int(rows) for images, rows, limit in cuts), cuts
        assert 1 <= int(cuts[-1][2]) <= 6, cuts
        assert max(b["result"]["batch"]["size"] for b in done.values()) <= 3
        ooms = log.count("out of memory with")

        second = [svc.submit({"prompt": f"a forest {i}", "seed": 80 + i, "steps": 10})
                  for i in range(8)]
        done = svc.wait_states(second, timeout=30)
        assert {b["state"] for b in done.values()} == {"SUCCESS"}
        assert max(b["result"]["batch"]["size"] for b in done.values()) <= 3
        assert worker.output().count("out of memory with") == ooms  # the limit holds

        # A request above the learnt limit runs alone and fails alone when it cannot fit.
        too_big = svc.submit({"prompt": "a mountain", "seed": 99, "steps": 10, "num_images": 4})
        done = svc.wait_states([too_big], timeout=30)
        assert done[too_big]["state"] == "FAILURE"
        assert done[too_big]["error"]["message"].startswith(
            "out of memory with 4 images in one batch (8 UNet rows; OutOfMemoryError: ")
        stats = (svc.celery.control.inspect([worker.hostname], timeout=2).stats() or {})
        batching = stats[worker.hostname]["batching"]
        assert batching["scheduler"] == "step" and batching["oom_image_limit"] <= 3


def test_a_short_request_leaves_before_a_long_one_it_joined(redis_base: str, tmp_path: Path) -> None:
    with fault_service(redis_base, tmp_path, IMAGEGENX_SCHEDULER="step",
                       IMAGEGENX_PROGRESS_INTERVAL_S="0") as svc:
        svc.start_worker("step-mixed")
        long_ = svc.submit({"prompt": "a long one", "seed": 1, "steps": 100})
        time.sleep(0.3)  # the long request runs (100 steps of about 16 ms)
        short = svc.submit({"prompt": "a short one", "seed": 2, "steps": 5})
        short_done = svc.wait_states([short], timeout=30)[short]
        assert short_done["state"] == "SUCCESS"
        long_now = svc.status(long_)
        assert long_now["state"] in ("PROGRESS", "STARTED"), long_now
        assert long_now["progress"]["total"] == 100 and long_now["progress"]["step"] < 100
        done = svc.wait_states([long_], timeout=30)
        assert done[long_]["state"] == "SUCCESS"
        # They shared UNet calls: both saw two requests in one call.
        assert done[long_]["result"]["batch"]["requests"] == 2
        assert short_done["result"]["batch"]["requests"] == 2
