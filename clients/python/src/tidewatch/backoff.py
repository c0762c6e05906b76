"""Exponential backoff with jitter for reconnecting broken Ingest streams.

The delay before attempt ``n`` is uniform in ``[cap/2, cap]`` with
``cap = min(initial * multiplier**n, max)``: it still grows, and the reconnects of many
devices after a server restart spread out instead of arriving as one wave.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Backoff settings of an ingest session (the same defaults as the Rust SDK)."""

    #: Cap of the first delay, in seconds.
    initial: float = 0.1
    #: Largest delay, in seconds.
    max: float = 10.0
    #: Growth of the cap per attempt.
    multiplier: float = 2.0
    #: Failed attempts in a row before the session gives up; ``None`` retries forever
    #: (devices on flaky networks keep trying). A verdict received resets the count.
    max_attempts: int | None = None

    def cap(self, attempt: int) -> float:
        """The exponential cap for ``attempt`` (0-based), before jitter."""
        factor = max(self.multiplier, 1.0) ** min(attempt, 64)
        return max(0.0, min(self.initial * factor, self.max))

    def delay(self, attempt: int) -> float:
        """The delay before ``attempt`` (0-based), in seconds, jittered."""
        cap = self.cap(attempt)
        return cap * (0.5 + random.random() * 0.5)
