"""The wait estimate of a queued task counts only the workers of its model's queue."""
from __future__ import annotations

from imagegenx.api.task_stream import queue_rate


def reply(host: str, rows: int, seconds: float, consuming: list[str] | None) -> dict:
    body = {"unet_rows": rows, "unet_seconds": seconds}
    if consuming is not None:
        body["consuming"] = consuming
    return {host: body}


def test_only_the_workers_of_the_queue_count() -> None:
    replies = [reply("a@h", 1000, 10.0, ["imagegenx.base"]),     # 100 rows/s
               reply("b@h", 600, 10.0, ["imagegenx.anime"]),     # 60 rows/s, another model
               reply("c@h", 400, 10.0, ["imagegenx.base", "imagegenx.anime"])]  # 40 rows/s, both
    assert queue_rate(replies, "imagegenx.base") == 140.0
    assert queue_rate(replies, "imagegenx.anime") == 100.0
    assert queue_rate(replies, "imagegenx.other") is None  # no worker: no estimate


def test_a_worker_that_does_not_say_what_it_consumes_counts_and_an_unmeasured_one_not() -> None:
    replies = [reply("a@h", 500, 5.0, None), reply("b@h", 0, 0.0, ["imagegenx"])]
    assert queue_rate(replies, "imagegenx") == 100.0
