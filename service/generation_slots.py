"""Admission control for local generation: a bounded number run, a bounded number wait.

At most settings.generation_concurrency generations hold a slot at once. Up to
settings.generation_queue_size more wait for one, each for at most
settings.generation_queue_timeout_seconds. A request beyond the queue, or one that
waited too long, gets 503 with a Retry-After header, so overload neither grows an
unbounded backlog of threads and memory nor makes every client wait.

A generation takes its slot before its model is loaded and gives it back when its
decode loop ends in the worker thread (service.routers.generate). Slots belong to the
event loop: acquire and release them there.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque

from service.errors import ServiceError
from service.settings import Settings

# Retry-After is estimated from the median hold time of this many recent generations. A
# median, unlike a mean, ignores the few slow first generations of a freshly loaded model
# (about 1 s each for the tiny test model, against 0.04 s later), once it has at least
# HOLD_TIME_MIN_SAMPLES of them.
HOLD_TIME_SAMPLES = 32
HOLD_TIME_MIN_SAMPLES = 5


class GenerationBusyError(ServiceError):
    """Every generation slot is taken and the queue is full, or the wait timed out."""

    status_code = 503


class GenerationSlot:
    """One acquired slot. release() is idempotent and must run on the event loop."""

    def __init__(self, slots: GenerationSlots) -> None:
        self._slots = slots
        self._started_at: float | None = None
        self._released = False

    def start_clock(self) -> None:
        """Time the hold from now, when the decode loop starts, so model loading is left out."""
        self._started_at = time.monotonic()

    def release(self) -> None:
        """Give the slot back; a slot whose decode loop never started is not timed."""
        if self._released:
            return
        self._released = True
        held = None if self._started_at is None else time.monotonic() - self._started_at
        self._slots._release(held)


class GenerationSlots:
    """A semaphore of generation slots with a bounded, time-limited queue in front of it."""

    def __init__(self, concurrency: int, queue_size: int, queue_timeout: float) -> None:
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self._semaphore = asyncio.Semaphore(concurrency)
        self._running = 0
        self._waiting = 0
        self._hold_seconds: deque[float] = deque(maxlen=HOLD_TIME_SAMPLES)

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationSlots:
        return cls(
            settings.generation_concurrency,
            settings.generation_queue_size,
            settings.generation_queue_timeout_seconds,
        )

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self) -> GenerationSlot:
        """Wait for a free slot; raise GenerationBusyError on a full queue or after the timeout."""
        if self._semaphore.locked() and self._waiting >= self.queue_size:
            raise self._busy(
                f"the server is busy: {self._running} generations running and {self._waiting} "
                f"waiting, the most this server queues (FURINA_GENERATION_QUEUE_SIZE)"
            )

        self._waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.queue_timeout)
        except TimeoutError:
            raise self._busy(
                f"the server is busy: no generation slot became free within "
                f"{self.queue_timeout:g} s (FURINA_GENERATION_QUEUE_TIMEOUT_SECONDS)"
            ) from None
        finally:
            self._waiting -= 1
        self._running += 1
        return GenerationSlot(self)

    def retry_after_seconds(self) -> int:
        """Estimate when a slot frees up for a new request: the queue ahead times the hold time.

        Returns at least 1, and 1 until HOLD_TIME_MIN_SAMPLES generations have been timed.
        """
        if len(self._hold_seconds) < HOLD_TIME_MIN_SAMPLES:
            return 1
        ahead = self._waiting + 1
        hold = statistics.median(self._hold_seconds)
        return max(1, math.ceil(hold * ahead / self.concurrency))

    def _busy(self, detail: str) -> GenerationBusyError:
        retry_after = self.retry_after_seconds()
        return GenerationBusyError(
            f"{detail}; retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )

    def _release(self, held_seconds: float | None) -> None:
        self._running -= 1
        self._semaphore.release()
        if held_seconds is not None:
            self._hold_seconds.append(held_seconds)
