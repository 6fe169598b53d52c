"""What a node knows about one upstream peer, as shown by /cluster, /metrics and `dsnode status`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class UpstreamState:
    url: str
    weight: int  # configured
    effective_weight: int  # the balancer's current effective weight (0 while marked down)
    healthy: bool  # passive health (max_fails/fail_timeout) and advertised readiness together
    name: str | None = None  # from its advertisement
    role: str | None = None
    ready: bool | None = None  # advertised readiness, None until first poll succeeds
    last_seen: float | None = None  # wall-clock time of the last successful poll
    last_error: str | None = None
    fails: int = 0  # failures within the current fail_timeout window
    forwarded: int = 0  # requests forwarded to it since start
    advert: dict[str, Any] | None = field(default=None)  # its latest advertisement
    reachable: bool | None = None  # did the last poll answer? None before the first poll
    in_flight: int = 0  # forwarded requests to it being served now
    down: bool = False  # taken out by passive health (max_fails within fail_timeout)
    max_fails: int = 1  # effective passive-health settings for this upstream
    fail_timeout: float = 10.0
