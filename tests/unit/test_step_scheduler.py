"""The step-level admission policy, driven by a fake clock (no Celery, no torch)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from imagegenx.step_scheduler import StepScheduler

STEP_S = 0.05  # simulated seconds per UNet call


@dataclass
class Req:
    id: str
    steps: int = 20
    tenant: str = ""
    group: str = "g"
    rows: int = 1
    priority: int = 0
    done: int = 0


def add(s: StepScheduler[Req], r: Req, now: float) -> None:
    s.add(r, r.id, r.group, r.rows, now, priority=r.priority, tenant=r.tenant)


def run(s: StepScheduler[Req], now: float, arrivals: dict[int, list[Req]] | None = None,
        max_calls: int = 100_000) -> tuple[list[str], dict[str, float]]:
    """Step the scheduler until nothing is left; (finish order, finish time per id)."""
    arrivals = arrivals or {}
    order: list[str] = []
    finished_at: dict[str, float] = {}
    for call in range(max_calls):
        for r in arrivals.pop(call, []):
            add(s, r, now)
        plan = s.schedule(now)
        if plan.idle:
            if not len(s) and not arrivals:
                return order, finished_at
            now = plan.wake_at if plan.wake_at is not None else now + STEP_S
            continue
        now += STEP_S
        done = []
        for r in plan.running:
            r.done += 1
            if r.done >= r.steps:
                done.append(r.id)
                order.append(r.id)
                finished_at[r.id] = now
        s.finish(done)
    raise AssertionError("did not finish")


def test_an_idle_scheduler_starts_the_first_request_at_once() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=8, max_wait=0.05)
    r = Req("a")
    add(s, r, 10.0)
    plan = s.schedule(10.0)
    assert plan.admitted == [r] and plan.running == [r] and plan.group == "g"


def test_requests_join_at_the_next_step_up_to_the_row_limit() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=4, max_wait=1.0)
    first = Req("first", rows=2)
    add(s, first, 0.0)
    assert s.schedule(0.0).running == [first]
    b, c, d = Req("b", rows=1), Req("c", rows=2), Req("d", rows=1)
    for r in (b, c, d):
        add(s, r, 0.01)
    plan = s.schedule(0.02)
    # b fits (3 rows); c (2 rows) does not, and d may not overtake it.
    assert plan.admitted == [b]
    assert plan.running == [first, b]
    s.finish(["first"])
    plan = s.schedule(0.03)
    assert plan.admitted == [c, d] and s.running_rows == 4


def test_admit_delay_holds_an_idle_start_until_it_passes_or_the_rows_are_full() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=2, max_wait=1.0, admit_delay=0.05)
    add(s, Req("a"), 0.0)
    plan = s.schedule(0.01)
    assert plan.idle and plan.wake_at == pytest.approx(0.05)
    assert s.next_deadline() == pytest.approx(0.05)
    assert [r.id for r in s.schedule(0.05).admitted] == ["a"]
    s2: StepScheduler[Req] = StepScheduler(max_rows=2, max_wait=1.0, admit_delay=0.05)
    add(s2, Req("a"), 0.0)
    add(s2, Req("b"), 0.0)
    assert [r.id for r in s2.schedule(0.0).admitted] == ["a", "b"]  # full: no reason to wait


def test_groups_never_share_a_call_and_switch_after_max_wait() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=8, max_wait=0.1)
    a1 = Req("a1", group="64x64")
    add(s, a1, 0.0)
    s.schedule(0.0)
    other = Req("o", group="128x128")
    add(s, other, 0.01)
    a2 = Req("a2", group="64x64")
    add(s, a2, 0.02)
    plan = s.schedule(0.05)
    assert plan.admitted == [a2] and other not in plan.running
    a3 = Req("a3", group="64x64")
    add(s, a3, 0.06)
    plan = s.schedule(0.12)  # the other group's head waited 0.11 >= max_wait: drain
    assert plan.admitted == [] and plan.running == [a1, a2]
    s.finish(["a1", "a2"])
    plan = s.schedule(0.2)
    assert plan.admitted == [other] and plan.group == "128x128"


def test_priority_orders_admission_and_fifo_breaks_ties() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=1, max_wait=1.0)
    low1, low2, high = Req("low1"), Req("low2"), Req("high", priority=5)
    add(s, low1, 0.0)
    add(s, low2, 0.1)
    add(s, high, 0.2)
    assert s.schedule(0.3).admitted == [high]
    s.finish(["high"])
    assert s.schedule(0.4).admitted == [low1]
    s.finish(["low1"])
    assert s.schedule(0.5).admitted == [low2]


def test_no_request_waits_forever_behind_higher_priorities() -> None:
    """A steady stream of priority-5 requests; a priority-0 one still starts
    once its age bonus lifts it to 5 (5 levels x priority_age_s), FIFO after that."""
    s: StepScheduler[Req] = StepScheduler(max_rows=1, max_wait=1.0, max_priority=5,
                                          priority_age_s=1.0)
    low = Req("low", steps=1)
    add(s, low, 0.0)
    now = 0.0
    started_at = None
    for i in range(400):
        add(s, Req(f"high{i}", steps=1, priority=5), now)
        plan = s.schedule(now)
        if low in plan.admitted:
            started_at = now
            break
        s.finish([r.id for r in plan.running])
        now += STEP_S
    assert started_at is not None, "the low-priority request never started"
    assert 5.0 <= started_at <= 5.0 + 2 * STEP_S


def test_one_keys_burst_cannot_starve_another() -> None:
    """Key A submits 200, key B submits 5 afterwards: B's 5 finish before A's 50th."""
    s: StepScheduler[Req] = StepScheduler(max_rows=8, max_wait=0.05)
    a = [Req(f"A{i}", tenant="A") for i in range(200)]
    b = [Req(f"B{i}", tenant="B") for i in range(5)]
    order, _ = run(s, 0.0, arrivals={0: a, 3: b})
    a50 = order.index("A49")
    assert all(order.index(r.id) < a50 for r in b), order[:60]


def test_keys_share_rows_round_robin() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=3, max_wait=1.0)
    for i in range(4):
        add(s, Req(f"A{i}", tenant="A"), 0.0)
        add(s, Req(f"B{i}", tenant="B"), 0.0)
        add(s, Req(f"C{i}", tenant="C"), 0.0)
    assert sorted(r.tenant for r in s.schedule(0.0).admitted) == ["A", "B", "C"]


def test_short_requests_leave_early_while_long_ones_go_on() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=8, max_wait=0.05)
    long_, short = Req("long", steps=50), Req("short", steps=10)
    order, at = run(s, 0.0, arrivals={0: [long_], 5: [short]})
    assert order == ["short", "long"]
    assert at["short"] == pytest.approx(15 * STEP_S)  # joined at call 5, ran its own 10 steps


def test_requeued_requests_keep_their_place() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=4, max_wait=1.0)
    first, second = Req("first", rows=2), Req("second", rows=2)
    add(s, first, 0.0)
    add(s, second, 0.1)
    s.schedule(0.2)
    s.max_rows = 2  # out of memory: fewer rows from now on
    s.requeue(["second"])
    add(s, Req("late"), 0.3)
    s.finish(["first"])
    assert s.schedule(0.4).admitted == [second]


def test_a_request_larger_than_the_row_limit_runs_alone() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=2, max_wait=1.0)
    big, small = Req("big", rows=4), Req("small")
    add(s, big, 0.0)
    add(s, small, 0.1)
    assert s.schedule(0.2).admitted == [big]
    assert s.schedule(0.3).admitted == []
    s.finish(["big"])
    assert s.schedule(0.4).admitted == [small]


def test_discard_and_drain_touch_only_the_waiting_pool() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=1, max_wait=1.0)
    run_me, b, c = Req("run"), Req("b"), Req("c")
    add(s, run_me, 0.0)
    s.schedule(0.0)
    add(s, c, 0.2)
    add(s, b, 0.1)
    assert s.discard(lambda r: r.id == "c") == [c]
    assert s.drain() == [b]
    assert s.running == [run_me] and s.waiting == []


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        StepScheduler(max_rows=0, max_wait=0.0)
    s: StepScheduler[Req] = StepScheduler(max_rows=1, max_wait=0.0)
    add(s, Req("a"), 0.0)
    with pytest.raises(ValueError, match="already"):
        add(s, Req("a"), 0.0)


def bucket_cost(rows: int) -> float:
    """A padded-bucket cost table like the SD1.5 UNet's on an H200 (seconds per call)."""
    table = {1: 0.0060, 2: 0.0094, 4: 0.0175, 8: 0.0337}
    return table[next(b for b in sorted(table) if b >= rows)]


def test_rows_join_free_bucket_room_but_not_a_costly_bucket_without_a_queue() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=8, max_wait=1.0, step_cost=bucket_cost,
                                          min_gain=0.05)
    a, b = Req("a", rows=2), Req("b", rows=1)
    add(s, a, 0.0)
    assert s.schedule(0.0).admitted == [a]
    add(s, b, 0.1)
    # 2 -> 3 rows pads to bucket 4: 17.5 ms for 3 images is less per second than 9.4 ms for 2.
    assert s.schedule(0.1).admitted == []
    s.finish(["a"])
    assert s.schedule(0.2).admitted == [b]
    c = Req("c", rows=1)
    add(s, c, 0.2)
    assert s.schedule(0.3).admitted == [c]  # 1 -> 2 rows: 9.4 ms for 2 images, a 27% gain


def test_a_costly_row_joins_once_a_queue_forms() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=8, max_wait=1.0, step_cost=bucket_cost)
    first = [Req("a0"), Req("a1")]
    for r in first:
        add(s, r, 0.0)
    assert s.schedule(0.0).admitted == first
    queue = [Req(f"q{i}") for i in range(2)]
    for r in queue:
        add(s, r, 0.1)
    # 2 rows wait beside 2 running: throughput comes first, and bucket 4 fills.
    assert s.schedule(0.1).admitted == queue


def test_free_rows_in_the_padded_bucket_always_join() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=8, max_wait=1.0, step_cost=bucket_cost,
                                          min_gain=10.0)
    add(s, Req("a", rows=3), 0.0)
    s.schedule(0.0)
    d = Req("d")
    add(s, d, 0.1)
    assert s.schedule(0.1).admitted == [d]  # 3 -> 4 rows: the same bucket, no extra cost


def test_shortest_order_admits_the_least_work_first() -> None:
    s: StepScheduler[Req] = StepScheduler(max_rows=1, max_wait=1.0, order="shortest")
    long_, short, wide = Req("long", steps=50), Req("short", steps=10), Req("wide", steps=10, rows=2)
    s.max_rows = 2
    for i, r in enumerate((long_, wide, short)):
        s.add(r, r.id, r.group, r.rows, float(i), steps=r.steps)
    assert s.schedule(3.0).admitted[0] is short  # 10 steps x 1 image before 10 x 2 and 50 x 1
    with pytest.raises(ValueError, match="order"):
        StepScheduler(max_rows=1, max_wait=0.0, order="random")


# -- UNet rows that change along the trajectory (guidance intervals) -----------

@dataclass
class Guided:
    """A one-image request that runs guidance (2 UNet rows) on part of its steps."""

    id: str
    steps: int = 10
    interval: tuple[float, float] = (0.0, 1.0)
    scale: float = 7.5
    done: int = 0

    def reserved(self) -> int:
        from imagegenx.guidance import reserved_rows

        return reserved_rows(self.scale, self.interval, self.done, self.steps)

    def rows_now(self) -> int:
        from imagegenx.guidance import rows_at

        return rows_at(self.scale, self.interval, self.done, self.steps) if self.done < self.steps else 0


def add_guided(s: StepScheduler[Guided], r: Guided, now: float) -> None:
    s.add(r, r.id, "g", r.reserved(), now, steps=r.steps, need=r.reserved)


def step_all(s: StepScheduler[Guided], now: float) -> tuple[list[Guided], int]:
    """One UNet call: the running requests and the UNet rows it ran; finished ones leave."""
    plan = s.schedule(now)
    rows = sum(r.rows_now() for r in plan.running)
    for r in plan.running:
        r.done += 1
    s.finish(r.id for r in plan.running if r.done >= r.steps)
    return plan.running, rows


def test_the_running_set_counts_unet_rows_and_admits_as_guidance_ends() -> None:
    s: StepScheduler[Guided] = StepScheduler(max_rows=4, max_wait=1.0)
    reqs = [Guided(f"r{i}", steps=10, interval=(0.0, 0.4)) for i in range(4)]
    for r in reqs:
        add_guided(s, r, 0.0)
    running, rows = step_all(s, 0.0)
    assert [r.id for r in running] == ["r0", "r1"]  # two guided images fill 4 rows
    assert rows == 4
    for _ in range(3):
        step_all(s, 0.0)
    # Guidance of r0 and r1 ended after 4 of 10 steps: 1 row each, so r2 (2 rows) joins.
    running, rows = step_all(s, 0.0)
    assert [r.id for r in running] == ["r0", "r1", "r2"] and rows == 4
    assert s.running_rows <= s.max_rows


def test_a_row_whose_guidance_starts_later_never_overfills_the_set() -> None:
    s: StepScheduler[Guided] = StepScheduler(max_rows=3, max_wait=1.0)
    late = [Guided(f"l{i}", steps=10, interval=(0.5, 1.0)) for i in range(3)]
    for r in late:
        add_guided(s, r, 0.0)
    peak = 0
    while len(s):
        _, rows = step_all(s, 0.0)
        peak = max(peak, rows)
        assert s.running_rows <= 3
    assert peak <= 3  # each reserves the 2 rows it will need: never two at once in 3 rows


def test_unguided_requests_take_one_row_each() -> None:
    s: StepScheduler[Guided] = StepScheduler(max_rows=4, max_wait=1.0)
    for i in range(6):
        add_guided(s, Guided(f"p{i}", scale=1.0), 0.0)
    running, rows = step_all(s, 0.0)
    assert len(running) == 4 and rows == 4
