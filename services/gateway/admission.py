"""Admission control: bound the requests and prompt tokens in flight before touching NATS."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.gateway import metrics
from services.gateway.errors import ApiError


class Admission:
    """Counts requests and prompt tokens in flight; refuses with 429 past either bound.

    Args:
        max_requests: most requests in flight.
        max_tokens: most prompt tokens in flight (a single larger prompt is still
            admitted when nothing else is in flight, so no valid request is refused forever).
        retry_after_s: the ``Retry-After`` of the 429.
    """

    def __init__(self, max_requests: int, max_tokens: int, retry_after_s: float) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.retry_after_s = retry_after_s
        self.num_requests = 0
        self.num_tokens = 0

    def can_admit(self, num_tokens: int) -> bool:
        if self.num_requests >= self.max_requests:
            return False
        return self.num_requests == 0 or self.num_tokens + num_tokens <= self.max_tokens

    @contextlib.contextmanager
    def admit(self, num_tokens: int) -> Iterator[None]:
        """Hold a slot for the duration of the ``with`` block, or raise a 429 ApiError."""
        if not self.can_admit(num_tokens):
            metrics.REJECTED.labels("gateway_busy").inc()
            raise ApiError(
                429, "the gateway is at its limit of requests in flight; retry later", type="rate_limit_error",
                code="too_many_requests", retry_after_s=self.retry_after_s,
            )
        self.num_requests += 1
        self.num_tokens += num_tokens
        metrics.IN_FLIGHT.set(self.num_requests)
        metrics.QUEUED_TOKENS.set(self.num_tokens)
        try:
            yield
        finally:
            self.num_requests -= 1
            self.num_tokens -= num_tokens
            metrics.IN_FLIGHT.set(self.num_requests)
            metrics.QUEUED_TOKENS.set(self.num_tokens)
