"""A step of a batch, done again after each failure until it succeeds.

The worker's decide and publish stages run through ``until_done``: a batch's records are
acknowledged only once every step of it has succeeded, so a step that fails (Redis or
Kafka away, or a bug) is retried with backoff for as long as it takes, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError

from creditgate.errors import InfrastructureError
from creditgate.observability import Metrics
from creditgate.settings import Settings

log = logging.getLogger("creditgate.worker")

T = TypeVar("T")


async def until_done(
    step: Callable[[], Awaitable[T]], stage: str, doing: str, settings: Settings, metrics: Metrics
) -> T:
    """``step()``'s result, calling it again after each failure, with backoff, for as
    long as it takes: a batch's records are never acknowledged half done. Each retry
    counts in ``creditgate_batch_retries_total{stage}``."""
    delay = settings.retry_backoff_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            done = await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: the batch stays uncommitted
            metrics.batch_retries.labels(stage).inc()
            log.warning(
                "%s failed (attempt %d), retrying in %.1fs: %s",
                doing,
                attempt,
                delay,
                exc,
                exc_info=not _is_infrastructure(exc),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max_seconds)
        else:
            if attempt > 1:
                log.info("%s done after %d attempts", doing, attempt)
            return done


def _is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, InfrastructureError | KafkaError | OSError)
