"""Which version of a model one request gets, from the shares of a split. Pure logic, no I/O.

- **Sticky** (the request names a user): the user's point in [0, 100) is a hash of the model name
  and the user (SHA-256), and the versions own consecutive slices of [0, 100) as wide as their
  shares, in the order the config lists them — nginx's `split_clients`. The same user gets the same
  version while the shares stay as they are; when a canary's share drops to 0, its users move and
  nobody else does.
- **Unsticky**: nginx's smooth weighted round-robin over the versions, weights = shares. Each run of
  100 consecutive picks (the sum of the shares) holds every version exactly its share of times, so
  1000 requests at 90/10 are exactly 900 and 100.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

Shares = Sequence[tuple[str, int]]  # (version key, percent), in the config's order
_HASH_SPAN = 1 << 64


def sticky_point(model: str, user: str) -> int:
    """The user's place on the split of `model`: an integer in [0, 2**64), read as a fraction of 100%."""
    digest = hashlib.sha256(f"{model}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def sticky_pick(shares: Shares, model: str, user: str) -> str | None:
    """The version whose slice holds the user's point; None when every share is 0."""
    total = sum(share for _, share in shares)
    if total <= 0:
        return None
    point = sticky_point(model, user)
    edge = 0
    for key, share in shares:
        edge += share
        if share and point * total < edge * _HASH_SPAN:
            return key
    return None  # not reached: the last slice ends at the total


class RoundRobin:
    """Smooth weighted round-robin over versions (`dsnode.cluster.balancer`'s rule, without health)."""

    def __init__(self, shares: Shares) -> None:
        self.weights = {key: share for key, share in shares if share > 0}
        self.current = {key: 0 for key in self.weights}

    def pick(self) -> str | None:
        total = sum(self.weights.values())
        best: str | None = None
        for key, weight in self.weights.items():
            self.current[key] += weight
            if best is None or self.current[key] > self.current[best]:
                best = key
        if best is not None:
            self.current[best] -= total
        return best
