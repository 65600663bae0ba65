"""Fair sharing of the GPU between tenants (SPEC section 12): the order in which queued work is taken.

Weighted fair queueing by images, on virtual time (start-time fair queueing with finish tags): each
request gets a tag when it is queued, `start + images / weight`, where `start` is the largest tag of the
tenant's work still waiting, if any, else the clock now; the clock is the tag of the last request taken.
Work is taken in tag order (first come first among equal tags). So each backlogged tenant gets images in
proportion to its weight, a tenant that was idle starts at the clock (no credit hoarded, no debt), and a
tenant with one 4-image request waits behind at most about one request of a tenant with fifty queued.
Without API keys every request is the same tenant's and the order is first in, first out.

`FairClock` is the in-process arithmetic (`local.LocalQueue`); the Redis queue runs the same arithmetic in
its scripts (`redis_scripts.PUT` and `CLAIM`), on the clock and the tags it keeps in Redis (a sorted set
of all waiting work and one per tenant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: A tenant's weight in the fair queue (from the keys file; 1 without one).
Weights = Callable[[str | None], float]


def equal_weights(tenant: str | None) -> float:
    return 1.0


@dataclass
class FairClock:
    """Virtual time: `now`, the tag of the work taken last."""

    now: float = 0.0

    def stamp(self, cost: float, tenant_last: float | None) -> float:
        """The tag of a request of `cost` (images / weight); `tenant_last`: the largest tag of its tenant's
        work waiting now (None: none waits), so that a cancelled request leaves no gap behind."""
        return max(self.now, self.now if tenant_last is None else tenant_last) + cost

    def taken(self, tag: float) -> None:
        """A request of this tag was taken: the clock moves on to it."""
        self.now = max(self.now, tag)
