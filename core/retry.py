"""Retry policy: capped exponential backoff with jitter and exception filtering."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from core.errors import ConfigurationError

ExcTypes = tuple[type[BaseException], ...]


@dataclass(frozen=True)
class RetryPolicy:
    """How failed records are retried.

    The delay before attempt ``n + 1`` after a failure of attempt ``n`` is
    ``base_delay * multiplier ** (n - 1)``, capped at ``max_delay``, then scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` (and capped again). With the defaults: 2, 4, 8, 16, 32 seconds.

    An error is retried when it is an instance of ``retry_on`` and not of ``no_retry_on``; any other error
    sends the record straight to ``failed``.
    """

    base_delay: float = 2.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    retry_on: ExcTypes = (Exception,)
    no_retry_on: ExcTypes = ()
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("retry delays must be >= 0")
        if self.multiplier < 1:
            raise ConfigurationError("retry multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ConfigurationError("retry jitter must be in [0, 1)")

    def base_delay_for(self, attempt: int) -> float:
        """The un-jittered delay after attempt number ``attempt`` (1-based) failed."""
        n = max(1, attempt)
        # Avoid float overflow for large attempt numbers: once past the cap, stay at the cap.
        try:
            raw = self.base_delay * self.multiplier ** (n - 1)
        except OverflowError:
            return self.max_delay
        return min(raw, self.max_delay)

    def delay_for(self, attempt: int) -> float:
        """The jittered delay after attempt ``attempt`` failed, never above ``max_delay``."""
        base = self.base_delay_for(attempt)
        if self.jitter:
            base *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return max(0.0, min(base, self.max_delay))

    def should_retry(self, error: BaseException | None) -> bool:
        """Whether ``error`` may be retried at all (attempt limits are enforced separately, in SQL)."""
        if error is None:
            return True
        if self.no_retry_on and isinstance(error, self.no_retry_on):
            return False
        return isinstance(error, self.retry_on)
