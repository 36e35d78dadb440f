"""Step-level admission policy: which waiting requests join the running set at
the next denoising step.

Pure logic, like ``imagegenx.batching``: the caller passes ``now`` (a
monotonic clock reading), so tests drive it with a fake clock; nothing here
imports Celery, kombu or torch.

The worker's model thread calls :meth:`StepScheduler.schedule` at every step
boundary, runs one UNet call for the plan's running rows, then reports the
requests that left (done, failed, revoked) with :meth:`StepScheduler.finish`
(schedule -> execute -> update, as LLM servers plan every forward pass).

Rules:
- Requests share a UNet call only within a *group* (model, latent size, LoRA
  set); steps, sampler, guidance, seed and prompt are per row. The running
  set holds one group at a time.
- When nothing runs, the best waiting request starts at once (after
  ``admit_delay``, 0 by default): later arrivals join at the next step, so
  waiting to gather a batch buys nothing.
- Admission order: effective priority first (higher first), then fair share
  (the API key with the fewest running rows, ties broken round-robin by who
  was served longest ago), then arrival order.
- Effective priority = priority + one level per ``priority_age_s`` waited, up
  to ``max_priority``: no request waits forever behind higher priorities.
- Rows are UNet rows: an image costs two per step while it runs classifier-free
  guidance and one outside its guidance interval (``imagegenx.guidance``). A
  request given a ``need`` callable is counted at what it returns at each
  step boundary (its *reserved* rows: the most any of its remaining steps runs,
  which never rises), so rows freed when guidance ends admit more requests and a
  running set never outgrows ``max_rows``. Without ``need`` a request counts its
  fixed ``rows``.
- A request's rows are admitted together; admission stops at the first
  request that does not fit (no overtaking by smaller requests, so a large
  request cannot starve). A request larger than ``max_rows`` (after an
  out-of-memory error lowered it) starts alone on an empty set.
- Group switch: once the head of another group has waited ``max_wait``, the
  running group admits no more; it drains and the other group starts.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Scheduled(Generic[T]):
    """The scheduler's own bookkeeping of an item in the waiting pool or the
    running set (never handed out: callers see their items)."""

    item: T
    id: str
    group: Hashable
    rows: int
    arrived: float
    priority: int = 0
    tenant: str = ""
    seq: int = 0
    steps: int = 0  # denoising steps to run (shortest-first ordering)
    # Its rows now, when they change along its trajectory (UNet rows; see the module docstring).
    need: Callable[[], int] | None = None

    @property
    def current_rows(self) -> int:
        return self.need() if self.need is not None else self.rows


@dataclass
class StepPlan(Generic[T]):
    """What the next UNet call runs."""

    admitted: list[T] = field(default_factory=list)  # join the running set now
    running: list[T] = field(default_factory=list)   # the whole running set, admitted included
    group: Hashable | None = None
    # Nothing runs and nothing may start yet: call schedule() again at this time.
    wake_at: float | None = None

    @property
    def idle(self) -> bool:
        return not self.running


class StepScheduler(Generic[T]):
    """Waiting pool and running set of one worker; see the module docstring."""

    def __init__(self, max_rows: int, max_wait: float, *, max_priority: int = 10,
                 priority_age_s: float = 10.0, admit_delay: float = 0.0,
                 order: str = "fifo", step_cost: Callable[[int], float] | None = None,
                 min_gain: float = 0.05) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if max_wait < 0 or admit_delay < 0:
            raise ValueError("max_wait and admit_delay must be >= 0")
        if priority_age_s <= 0:
            raise ValueError("priority_age_s must be > 0")
        self.max_rows = max_rows
        self.max_wait = max_wait
        self.max_priority = max_priority
        self.priority_age_s = priority_age_s
        self.admit_delay = admit_delay
        if order not in ("fifo", "shortest"):
            raise ValueError("order must be fifo or shortest")
        self.order = order
        self.step_cost = step_cost
        self.min_gain = min_gain
        self._waiting: dict[str, _Scheduled[T]] = {}
        self._running: dict[str, _Scheduled[T]] = {}
        self._seq = itertools.count()
        self._served = itertools.count()
        self._last_served: dict[str, int] = {}

    # -- the waiting pool --------------------------------------------------
    def add(self, item: T, id: str, group: Hashable, rows: int, now: float, *,
            priority: int = 0, tenant: str = "", steps: int = 0,
            need: Callable[[], int] | None = None) -> None:
        """Queue a request of ``rows`` rows, or of ``need()`` rows at each step boundary."""
        if rows < 1:
            raise ValueError("a request needs at least one row")
        if id in self._waiting or id in self._running:
            raise ValueError(f"request {id} is already scheduled")
        self._waiting[id] = _Scheduled(item, id, group, rows, now, priority, tenant, next(self._seq),
                                       steps, need)

    def requeue(self, ids: Iterable[str]) -> None:
        """Move running requests back to waiting (e.g. they did not fit after an
        out-of-memory error); they keep their arrival time and place."""
        for id in ids:
            w = self._running.pop(id, None)
            if w is not None:
                self._waiting[id] = w

    def discard(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the waiting items for which ``predicate`` is true."""
        gone = [w for w in self._waiting.values() if predicate(w.item)]
        for w in gone:
            del self._waiting[w.id]
        return [w.item for w in gone]

    def drain(self) -> list[T]:
        """Remove every waiting item, oldest first (shutdown, lost connection)."""
        items = [w.item for w in sorted(self._waiting.values(), key=lambda w: (w.arrived, w.seq))]
        self._waiting.clear()
        return items

    def finish(self, ids: Iterable[str]) -> None:
        """Requests that left the running set (done, failed or revoked)."""
        for id in ids:
            self._running.pop(id, None)

    # -- inspection ----------------------------------------------------------
    @property
    def waiting(self) -> list[T]:
        return [w.item for w in self._waiting.values()]

    @property
    def running(self) -> list[T]:
        return [w.item for w in self._running.values()]

    @property
    def running_rows(self) -> int:
        return sum(w.current_rows for w in self._running.values())

    def __len__(self) -> int:
        return len(self._waiting) + len(self._running)

    def __iter__(self) -> Iterator[T]:
        """The waiting items."""
        yield from (w.item for w in self._waiting.values())

    # -- planning ------------------------------------------------------------
    def _effective_priority(self, w: _Scheduled[T], now: float) -> int:
        aged = w.priority + int(max(0.0, now - w.arrived) // self.priority_age_s)
        return max(w.priority, min(self.max_priority, aged))

    def schedule(self, now: float) -> StepPlan[T]:
        """Admit what may join at this step boundary; the plan of the next UNet call."""
        plan: StepPlan[T] = StepPlan()
        group = self._running_group()
        if group is None:
            if not self._waiting:
                return plan
            head = min(self._waiting.values(), key=lambda w: self._order(w, now, {}))
            group = head.group
            ready_at = head.arrived + self.admit_delay
            if now < ready_at and self._group_rows(group) < self.max_rows:
                plan.wake_at = ready_at
                return plan
        elif self._switching(group, now):
            group = None  # draining: the running set admits nothing more
        if group is not None:
            plan.admitted = self._admit(group, now)
        plan.running = [w.item for w in self._running.values()]
        plan.group = self._running_group()
        return plan

    def next_deadline(self) -> float | None:
        """When an idle scheduler should look again (the earliest admission time)."""
        if self._running or not self._waiting:
            return None
        return min(w.arrived for w in self._waiting.values()) + self.admit_delay

    def _running_group(self) -> Hashable | None:
        return next(iter(self._running.values())).group if self._running else None

    def _group_rows(self, group: Hashable) -> int:
        return sum(w.current_rows for w in self._waiting.values() if w.group == group)

    def _switching(self, group: Hashable, now: float) -> bool:
        """Another group's request has waited long enough: stop admitting to ``group``."""
        return any(w.group != group and now - w.arrived >= self.max_wait
                   for w in self._waiting.values())

    def _order(self, w: _Scheduled[T], now: float,
               tenant_rows: dict[str, int]) -> tuple[int, int, int, int, float, int]:
        work = w.steps * w.current_rows if self.order == "shortest" else 0
        return (-self._effective_priority(w, now), tenant_rows.get(w.tenant, 0),
                self._last_served.get(w.tenant, -1), work, w.arrived, w.seq)

    def _worth_growing(self, rows: int, extra: int, backlog: int) -> bool:
        """Whether ``extra`` rows should join ``rows`` running ones.

        Rows that fit the UNet call's padded bucket are free; beyond it every row
        slows every running request. That pays only when it raises the images per
        second by ``min_gain``, or when the waiting rows are as many as the running
        ones (a queue is forming: throughput comes first).
        """
        if self.step_cost is None or rows == 0:
            return True
        now_s, then_s = self.step_cost(rows), self.step_cost(rows + extra)
        if then_s <= now_s or backlog >= rows:
            return True
        return (rows + extra) / then_s >= (1.0 + self.min_gain) * rows / now_s

    def _admit(self, group: Hashable, now: float) -> list[T]:
        tenant_rows: dict[str, int] = {}
        for w in self._running.values():
            tenant_rows[w.tenant] = tenant_rows.get(w.tenant, 0) + w.current_rows
        admitted: list[T] = []
        candidates = [w for w in self._waiting.values() if w.group == group]
        while candidates:
            best = min(candidates, key=lambda w: self._order(w, now, tenant_rows))
            running = self.running_rows
            free = self.max_rows - running
            rows = best.current_rows
            if rows > free and (self._running or admitted):
                break
            if not self._worth_growing(running, rows, sum(w.current_rows for w in candidates)):
                break
            candidates.remove(best)
            del self._waiting[best.id]
            self._running[best.id] = best
            tenant_rows[best.tenant] = tenant_rows.get(best.tenant, 0) + rows
            self._last_served[best.tenant] = next(self._served)
            admitted.append(best.item)
            if rows > free:  # larger than the limit: it runs alone
                break
        return admitted
