"""Request scheduler: a request that breaks its batch fails alone; an out-of-memory
batch is split and retried smaller, and the worker keeps its batches under the size
that ran out. (The step scheduler's versions: test_step_faults.py.)

Faults are injected by the synthetic engine (IMAGEGENX_SYNTHETIC_FAULTS), through
the real queue path and a real worker process.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.fault_stack import fault_service

pytestmark = pytest.mark.integration


def test_poison_request_fails_alone_and_its_batch_completes(redis_base: str,
                                                            tmp_path: Path) -> None:
    with fault_service(redis_base, tmp_path, IMAGEGENX_SCHEDULER="request", IMAGEGENX_MAX_BATCH="8",
                       IMAGEGENX_MAX_WAIT_MS="1000",
                       IMAGEGENX_SYNTHETIC_FAULTS="raise:POISON") as svc:
        worker = svc.start_worker("poison")
        t0 = time.monotonic()
        good = [svc.submit({"prompt": f"a quiet harbour {i}", "seed": 40 + i, "steps": 10})
                for i in range(7)]
        bad = svc.submit({"prompt": "a POISON apple", "seed": 47, "steps": 10})
        done = svc.wait_states(good + [bad], timeout=20)
        elapsed = time.monotonic() - t0

        assert done[bad]["state"] == "FAILURE"
        assert done[bad]["error"]["type"] == "GenerationError"
        assert "injected fault: a prompt contains 'POISON'" in done[bad]["error"]["message"]
        for t in good:
            assert done[t]["state"] == "SUCCESS", done[t]
        # All eight were one batch; bisection ran the good ones in smaller batches.
        assert max(done[t]["result"]["batch"]["requests"] for t in good) == 4
        log = worker.output()
        assert "batch of 8 failed" in log
        assert log.count("retrying in halves") == 3  # 8 -> 4 -> 2 -> 1 on the poison's side
        assert not (tmp_path / "images" / bad).exists()
        # A failed request is finished: not delivered again.
        assert svc.deliveries(bad) == {"received": 1, "started": 1}
        assert bad not in svc.unacked_ids()
        sizes = sorted({done[t]["result"]["batch"]["requests"] for t in good})
        print(f"\npoison: 8 submitted, 7 SUCCESS in batches of {sizes} requests, "
              f"1 FAILURE; all done {elapsed:.2f} s after the first submit")


def test_out_of_memory_splits_the_batch_and_lowers_the_batch_size(redis_base: str,
                                                                  tmp_path: Path) -> None:
    # The engine runs out of memory above 3 images per batch.
    with fault_service(redis_base, tmp_path, IMAGEGENX_SCHEDULER="request", IMAGEGENX_MAX_BATCH="8",
                       IMAGEGENX_MAX_WAIT_MS="1000",
                       IMAGEGENX_SYNTHETIC_FAULTS="oom:3") as svc:
        worker = svc.start_worker("oom")
        t0 = time.monotonic()
        first = [svc.submit({"prompt": f"a field {i}", "seed": 60 + i, "steps": 10})
                 for i in range(8)]
        done = svc.wait_states(first, timeout=20)
        first_s = time.monotonic() - t0
        assert {b["state"] for b in done.values()} == {"SUCCESS"}
        # 8 ran out of memory, then 4: halved twice, everything ran in batches of 2.
        assert {b["result"]["batch"]["size"] for b in done.values()} == {2}
        log = worker.output()
        assert "out of memory with 8 images: batches are cut to at most 4 images" in log
        assert "out of memory with 4 images: batches are cut to at most 2 images" in log

        # Later full batches are cut to the size that fits: no OOM any more.
        second = [svc.submit({"prompt": f"a forest {i}", "seed": 80 + i, "steps": 10})
                  for i in range(8)]
        done = svc.wait_states(second, timeout=20)
        assert {b["state"] for b in done.values()} == {"SUCCESS"}
        assert {b["result"]["batch"]["size"] for b in done.values()} == {2}
        assert worker.output().count("OutOfMemoryError") == 2

        # A request above the learnt limit runs alone: it succeeds if it fits the
        # memory, and fails alone, with a clear message, if it does not.
        fits = svc.submit({"prompt": "a hill", "seed": 98, "steps": 10, "num_images": 3})
        too_big = svc.submit({"prompt": "a mountain", "seed": 99, "steps": 10, "num_images": 4})
        done = svc.wait_states([fits, too_big], timeout=20)
        assert done[fits]["state"] == "SUCCESS"
        assert done[fits]["result"]["batch"]["size"] == 3
        assert done[too_big]["state"] == "FAILURE"
        assert done[too_big]["error"]["message"].startswith(
            "out of memory with 4 images in one batch (OutOfMemoryError: ")
        inspect = svc.celery.control.inspect([worker.hostname], timeout=2)
        stats = (inspect.stats() or {})[worker.hostname]
        assert stats["batching"]["oom_image_limit"] == 2  # a lone large request did not lower it
        print(f"\nout of memory: 8 submitted, all SUCCESS in batches of 2 after 2 OOMs, "
              f"{first_s:.2f} s after the first submit")
