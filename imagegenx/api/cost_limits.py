"""Cost limits of submissions: the largest cost of one request (422) and each
API key's budget of cost units per minute (429), counted in Redis.

The rate limit counts requests; one request may cost thousands of times
another (imagegenx.cost), so the budget counts units instead: a moving window
(limits' MovingWindowRateLimiter, cost-weighted hits, shared by every API
process through Redis) keyed by the caller's key digest.
"""
from __future__ import annotations

import time

from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import Counter
from redis import Redis

from imagegenx.api.errors import ApiError
from imagegenx.api.metrics import REGISTRY
from imagegenx.cost import BUDGET_WINDOW_S, cost_drivers, seconds_until_free
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings

NAMESPACE = "imagegenx-cost"
# Labelled by outcome only: a label per key would grow without bound.
COST_UNITS = Counter("imagegenx_api_cost_units", "Cost units of submissions, by outcome "
                     "(accepted, over_budget, too_costly)", ["outcome"], registry=REGISTRY)
for _outcome in ("accepted", "over_budget", "too_costly"):
    COST_UNITS.labels(_outcome)  # present at 0 from the start, so rate() works


def refuse_too_costly(request: GenerateRequest, cost: int, settings: Settings) -> None:
    """422 naming ``cost``, the limit and the fields that drive it, when one
    request costs more than max_request_cost or than the whole budget."""
    limits = [(v, name) for v, name in ((settings.max_request_cost, "max_request_cost"),
                                         (settings.cost_budget_per_minute, "cost_budget_per_minute"))
              if v]
    over = [(v, name) for v, name in limits if cost > v]
    if not over:
        return
    limit, name = min(over)
    COST_UNITS.labels("too_costly").inc(cost)
    raise ApiError(422, "invalid request", cost=cost, max_cost=limit, fields=[{
        "field": "cost",
        "reason": f"{cost} cost units is more than {limit}, the most one request may cost "
                  f"({name}); lower steps, num_images, width or height. Cost = "
                  f"{cost_drivers(request, settings.cost_unset_side)}"}])


class CostBudget:
    """Each key's cost units per minute, in the API's Redis."""

    def __init__(self, client: Redis, per_minute: int) -> None:
        self.item = RateLimitItemPerMinute(per_minute, namespace=NAMESPACE) if per_minute else None
        # The API's own pool (Sentinel-aware, short timeouts): a dead Redis is a fast 503.
        self.storage = RedisStorage("redis://", connection_pool=client.connection_pool)
        self.limiter = MovingWindowRateLimiter(self.storage)

    def charge(self, digest: str, cost: int) -> None:
        """Take ``cost`` units from the key's budget, or raise 429 with Retry-After."""
        if self.item is None:
            return
        if self.limiter.hit(self.item, digest, cost=cost):
            return
        budget = self.item.amount
        # The moving window keeps one entry per unit, newest first: the charge
        # fits once the entry at index budget - cost has left the window.
        key = self.storage.prefixed_key(self.item.key_for(digest))
        entry = self.storage.get_connection().lindex(key, budget - cost)
        now = time.time()
        wait = seconds_until_free(None if entry is None else float(entry), now, BUDGET_WINDOW_S)
        COST_UNITS.labels("over_budget").inc(cost)
        raise ApiError(429, f"cost budget of this API key exceeded: this request costs {cost} "
                            f"units, the budget is {budget} units per minute",
                       headers={"Retry-After": str(wait)}, cost=cost, budget_per_minute=budget,
                       retry_after_s=wait, frees_at=round(now + wait, 3))
